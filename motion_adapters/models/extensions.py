"""Opt-in extensions of Show-1's 3D UNet, and the weight surgery that adds them to a trained UNet.

All are off by default (``EXTENSIONS``), so Show-1 checkpoints load and run unchanged:

- ``frame_embedding_frames`` (see ``blocks_show1.add_frame_embedding``): a learned per-frame vector before each
  temporal transformer.
- ``temporal_conv_spatial_kernel``: Show-1's temporal convolutions are ``(3, 1, 1)`` kernels, so no temporal layer
  ever looks at a neighbouring pixel and a moving object can only be shifted by the spatial layers of each frame.
  A value ``k > 1`` widens the first of the four convolutions of every ``TemporalConvLayer`` to ``(3, k, k)``,
  letting frame ``t + 1`` read frame ``t`` around the same pixel (one wide convolution a layer is enough for that;
  widening all four would multiply the layer's cost by ``k * k``). The widened kernels keep the old weights at the
  centre tap and start the new taps at zero, so a widened UNet computes exactly what the narrow one did until it is
  trained.
- ``coordinate_frequencies``: Show-1's convolutions and attention carry no absolute position (only what zero padding
  leaks), so a layout that depends on where a pixel is in the frame (an object moving right starts on the left) is
  hard to draw from pure noise. A value ``n > 0`` adds ``CoordinateEmbedding``, a zero-initialised linear map of
  ``4 n`` sine and cosine features of each pixel's (x, y), as fractions of the frame, to the output of ``conv_in``.
  Fractions, not pixel indices, so one model serves every resolution.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.resnet import TemporalConvLayer
from torch import nn

__all__ = [
    "EXTENSIONS",
    "CoordinateEmbedding",
    "check_extension",
    "extend_unet",
    "widen_kernel",
    "widen_temporal_convs",
]


# key -> (default: Show-1's architecture, smallest value, must be odd, what the default means)
EXTENSIONS: dict[str, tuple[int, int, bool, str]] = {
    "frame_embedding_frames": (0, 0, False, "0, Show-1's choice, adds none"),
    "temporal_conv_spatial_kernel": (1, 1, True, "1, Show-1's choice, looks at no neighbouring pixel"),
    "coordinate_frequencies": (0, 0, False, "0, Show-1's choice, adds no position features"),
}
"""The extension config keys, each off at its default."""


def check_extension(key: str, value: Any) -> None:
    """Raise ValueError naming ``key`` unless ``value`` is an int it accepts (see ``EXTENSIONS``).

    Example:
        >>> check_extension("temporal_conv_spatial_kernel", 3)
    """
    _, minimum, odd, meaning = EXTENSIONS[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or (odd and value % 2 == 0):
        kind = "an odd int" if odd else "an int"
        raise ValueError(f"`{key}` must be {kind} >= {minimum} ({meaning}), got {value!r}.")


class CoordinateEmbedding(nn.Module):
    """A learned map of each pixel's Fourier position features to ``channels``, zero at initialisation.

    Features: ``sin`` and ``cos`` of ``pi * 2**k * u`` for ``k < num_frequencies`` and ``u`` each of the pixel
    centre's x and y as fractions of the frame's width and height.

    Example:
        >>> emb = CoordinateEmbedding(4, 8)
        >>> emb(16, 24).shape, torch.count_nonzero(emb(16, 24)).item()
        (torch.Size([8, 16, 24]), 0)
    """

    def __init__(self, num_frequencies: int, channels: int):
        super().__init__()
        self.num_frequencies = num_frequencies
        self.proj = nn.Linear(4 * num_frequencies, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def features(self, height: int, width: int) -> torch.Tensor:
        """The (height, width, 4 * num_frequencies) position features."""
        device, dtype = self.proj.weight.device, self.proj.weight.dtype
        y = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        x = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        scales = torch.pi * 2.0 ** torch.arange(self.num_frequencies, device=device, dtype=torch.float32)
        grid = torch.stack(torch.meshgrid(y, x, indexing="ij"), dim=-1)  # (H, W, 2)
        angles = (grid[..., None] * scales).flatten(-2)  # (H, W, 2 * num_frequencies)
        return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)

    def forward(self, height: int, width: int) -> torch.Tensor:
        """The (channels, height, width) embedding, to add to every frame."""
        return self.proj(self.features(height, width)).permute(2, 0, 1)


def widen_kernel(weight: torch.Tensor, kernel: int) -> torch.Tensor:
    """Embed a ``(out, in, t, 1, 1)`` convolution weight at the centre of a zero ``(out, in, t, k, k)`` one.

    Example:
        >>> widen_kernel(torch.ones(2, 2, 3, 1, 1), 3)[0, 0, 0]
        tensor([[0., 0., 0.],
                [0., 1., 0.],
                [0., 0., 0.]])
    """
    check_extension("temporal_conv_spatial_kernel", kernel)
    if weight.ndim != 5 or weight.shape[-2:] != (1, 1):
        raise ValueError(f"expected a (out, in, t, 1, 1) temporal convolution weight, got {tuple(weight.shape)}.")
    wide = weight.new_zeros(*weight.shape[:3], kernel, kernel)
    wide[..., kernel // 2, kernel // 2] = weight[..., 0, 0]
    return wide


def widen_temporal_convs(module: nn.Module, kernel: int) -> int:
    """Widen the first ``Conv3d`` of every ``TemporalConvLayer`` in ``module`` to ``(3, kernel, kernel)``, in place.

    The old weights become the centre taps and the new taps start at zero (see ``widen_kernel``), so the module's
    outputs do not change. Returns the number of convolutions widened.

    Example:
        >>> layer = TemporalConvLayer(32, 32, norm_num_groups=32)
        >>> widen_temporal_convs(layer, 3), layer.conv1[2].kernel_size
        (1, (3, 3, 3))
    """
    check_extension("temporal_conv_spatial_kernel", kernel)
    widened = 0
    for layer in [m for m in module.modules() if isinstance(m, TemporalConvLayer)]:  # listed before any change
        index, conv = next((i, m) for i, m in enumerate(layer.conv1) if isinstance(m, nn.Conv3d))
        if conv.kernel_size[1:] == (kernel, kernel):
            continue
        wide = nn.Conv3d(
            conv.in_channels,
            conv.out_channels,
            (conv.kernel_size[0], kernel, kernel),
            padding=(conv.padding[0], kernel // 2, kernel // 2),
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            wide.weight.copy_(widen_kernel(conv.weight, kernel))
            wide.bias.copy_(conv.bias)
        layer.conv1[index] = wide
        widened += 1
    return widened


def extend_unet(unet: nn.Module, **extensions: Any) -> nn.Module:
    """A copy of a trained Show-1 UNet with extension config keys set, computing what ``unet`` computes.

    Every weight is carried over; new frame-embedding tables start at zero and widened temporal convolutions keep
    the old weights at their centre tap. Lowering an extension (fewer table rows, a narrower kernel) would drop
    trained weights and is refused.

    Args:
        unet: A ``Show1UNet3DConditionModel``.
        **extensions: Any of ``frame_embedding_frames``, ``temporal_conv_spatial_kernel`` and
            ``coordinate_frequencies``.

    Example:
        >>> wide = extend_unet(unet, temporal_conv_spatial_kernel=3, frame_embedding_frames=16)  # doctest: +SKIP
    """
    unknown = sorted(set(extensions) - set(EXTENSIONS))
    if unknown:
        raise ValueError(f"extend_unet takes only the extension keys {list(EXTENSIONS)}, got {unknown}.")
    # diffusers drops keys listed in the private `_use_default_values` of a loaded config: pass public keys only.
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    for key, value in extensions.items():
        check_extension(key, value)
        current = config.get(key, EXTENSIONS[key][0])
        if value < current:
            raise ValueError(f"`{key}={value}` is smaller than this UNet's {current}: it would drop weights.")
    config.update(extensions)
    extended = type(unet).from_config(config)
    state = dict(unet.state_dict())
    targets = extended.state_dict()
    for key, value in state.items():
        if key in targets and value.ndim == 5 and value.shape != targets[key].shape:
            state[key] = widen_kernel(value, targets[key].shape[-1])
    missing, unexpected = extended.load_state_dict(state, strict=False)
    if unexpected or any(".frame_embeddings." not in key and "coordinate_embedding." not in key for key in missing):
        raise RuntimeError(f"extend_unet: unexpected keys {unexpected}, missing keys {missing}")
    return extended.to(device=unet.device, dtype=unet.dtype).train(unet.training)
