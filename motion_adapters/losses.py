"""Frame-residual algebra and the motion distillation losses of VMC, as pure tensor functions.

Videos and noises are shaped (B, C, F, H, W); `abar` is the cumulative product of the scheduler's alphas at each
sample's timestep, shaped (B,) (or a scalar). Equation numbers refer to Jeong et al., "VMC" (2023).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

FRAME_DIM = 2


def frame_residual(x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Consecutive-frame residual delta x^n = x^(n+c) - x^n along the frame axis.

    Args:
        x: a video-shaped tensor (B, C, F, H, W).
        stride: the frame stride c >= 1.

    Returns:
        A tensor (B, C, F - c, H, W).

    Raises:
        ValueError: if `x` is not 5-D or has fewer than `stride + 1` frames.

    Example:
        >>> x = torch.arange(4.0).view(1, 1, 4, 1, 1)
        >>> frame_residual(x).flatten().tolist()
        [1.0, 1.0, 1.0]
    """
    _check_video("x", x)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride={stride!r} must be a positive int.")
    frames = x.shape[FRAME_DIM]
    if frames < stride + 1:
        raise ValueError(
            f"x has {frames} frame(s); a residual with stride={stride} needs at least {stride + 1}. "
            f"Use more frames or a smaller stride."
        )
    return x[:, :, stride:] - x[:, :, :-stride]


def split_epsilon(model_output: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Keep the epsilon channels of a UNet output.

    Show-1 (like DeepFloyd IF) predicts 2 * C channels: epsilon, then learned-variance channels. Only the
    epsilon part enters the motion loss.

    Args:
        model_output: (B, C_out, F, H, W) with C_out equal to `in_channels` or `2 * in_channels`.
        in_channels: channels of the noised sample (3 for Show-1's pixel space, 4 for SD latents).

    Example:
        >>> split_epsilon(torch.zeros(1, 6, 2, 4, 4), 3).shape
        torch.Size([1, 3, 2, 4, 4])
    """
    _check_video("model_output", model_output)
    channels = model_output.shape[1]
    if channels == in_channels:
        return model_output
    if channels == 2 * in_channels:
        return model_output[:, :in_channels]
    raise ValueError(
        f"model_output has {channels} channels; expected in_channels={in_channels} (epsilon) or "
        f"{2 * in_channels} (epsilon + learned variance)."
    )


PREDICTION_TYPES = ("epsilon", "v_prediction")
"""Model outputs the losses accept: epsilon (Show-1, ModelScope, AnimateDiff) or v (Salimans & Ho 2022)."""


def prediction_type(noise_scheduler) -> str:
    """The ``prediction_type`` of a diffusers scheduler's config ("epsilon" when it has none), checked.

    Example:
        >>> from diffusers import DDPMScheduler
        >>> prediction_type(DDPMScheduler(prediction_type="v_prediction"))
        'v_prediction'
    """
    config = getattr(noise_scheduler, "config", None)
    value = getattr(config, "prediction_type", None) or "epsilon"
    if value not in PREDICTION_TYPES:
        raise ValueError(
            f"the noise scheduler's prediction_type={value!r} is not supported; motion_adapters trains UNets that "
            f"predict one of {PREDICTION_TYPES}."
        )
    return value


def epsilon_from_output(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    abar: torch.Tensor | float,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """The epsilon a UNet predicts, from its (already `split_epsilon`-ed) output.

    For ``"epsilon"`` the output is returned unchanged. For ``"v_prediction"``, with
    v = sqrt(abar) eps - sqrt(1 - abar) x_0 and x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps, the noise is
    eps = sqrt(1 - abar) x_t + sqrt(abar) v, so the motion loss compares the same quantity whatever the model
    predicts.

    Args:
        model_output: (B, C, F, H, W) epsilon or v.
        sample: the noised input x_t, same shape.
        abar: alpha-bar of each sample's timestep, a float or a (B,) tensor.
        prediction_type: the scheduler's ``prediction_type``.

    Example:
        >>> x_t, v = torch.ones(1, 1, 2, 1, 1), torch.zeros(1, 1, 2, 1, 1)
        >>> epsilon_from_output(v, x_t, 0.75, "v_prediction").flatten().tolist()
        [0.5, 0.5]
    """
    if prediction_type == "epsilon":
        return model_output
    if prediction_type != "v_prediction":
        raise ValueError(
            f"prediction_type={prediction_type!r} is not supported; use one of {PREDICTION_TYPES} "
            "(set it in the noise scheduler's config)."
        )
    _check_same("model_output", model_output, "sample", sample)
    a = _per_sample(abar, model_output)
    return (1 - a).sqrt() * sample + a.sqrt() * model_output


def add_noise(v0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor | float) -> torch.Tensor:
    """Forward diffusion v_t = sqrt(abar_t) v_0 + sqrt(1 - abar_t) eps, per sample.

    Example:
        >>> add_noise(torch.ones(1, 1, 2, 1, 1), torch.zeros(1, 1, 2, 1, 1), 0.25).flatten().tolist()
        [0.5, 0.5]
    """
    _check_same("v0", v0, "eps", eps)
    a = _per_sample(abar, v0)
    return a.sqrt() * v0 + (1 - a).sqrt() * eps


def tweedie_x0(v_t: torch.Tensor, eps_pred: torch.Tensor, abar: torch.Tensor | float) -> torch.Tensor:
    """Tweedie's clean estimate (eq. 12): vhat_0 = (v_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t).

    Applied to frame residuals it is eq. 13 (with the predicted residual) and eq. 14 (with the true one),
    since the map is linear: `tweedie_x0(frame_residual(v_t), frame_residual(eps), abar)`.

    Example:
        >>> v0 = torch.randn(1, 3, 4, 2, 2); eps = torch.randn_like(v0)
        >>> torch.allclose(tweedie_x0(add_noise(v0, eps, 0.3), eps, 0.3), v0, atol=1e-5)
        True
    """
    _check_same("v_t", v_t, "eps_pred", eps_pred)
    a = _per_sample(abar, v_t)
    return (v_t - (1 - a).sqrt() * eps_pred) / a.sqrt()


def motion_vectors(
    v_t: torch.Tensor, eps_pred: torch.Tensor, abar: torch.Tensor | float, stride: int = 1
) -> torch.Tensor:
    """Predicted motion vectors delta vhat_0(t) (eq. 13) from a noised video and predicted noise.

    Example:
        >>> v = torch.zeros(1, 3, 4, 2, 2)
        >>> motion_vectors(v, v, 0.5).shape
        torch.Size([1, 3, 3, 2, 2])
    """
    return tweedie_x0(frame_residual(v_t, stride), frame_residual(eps_pred, stride), abar)


def l2_weight(abar: torch.Tensor | float) -> torch.Tensor:
    """The per-timestep weight (1 - abar_t) / abar_t that turns epsilon-residual l2 into motion l2 (eq. 16).

    Example:
        >>> float(l2_weight(0.5))
        1.0
    """
    a = abar if isinstance(abar, torch.Tensor) else torch.tensor(abar, dtype=torch.float64)
    # the range check reads the values back to the host, which a CUDA graph capture forbids (the training step
    # is captured on CUDA); the captured step's abar comes from the scheduler, so it is checked when eager
    capturing = a.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and (torch.any(a <= 0) or torch.any(a > 1)):
        raise ValueError("abar must lie in (0, 1]: pass alphas_cumprod at the sampled timesteps.")
    return (1 - a) / a


def cosine_loss_paper(eps: torch.Tensor, eps_pred: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """The paper's objective (eq. 17): mean over frame pairs and batch of 1 - cos(delta eps, delta eps_theta).

    Each frame pair's residual is flattened over (C, H, W) before the cosine. The value lies in [0, 2], is 0
    when the residuals point the same way, and ignores positive scaling of either argument.

    Args:
        eps: the true noise (B, C, F, H, W).
        eps_pred: the UNet's epsilon prediction, same shape (use `split_epsilon` first).
        stride: the frame stride c.

    Example:
        >>> e = torch.randn(2, 3, 4, 8, 8)
        >>> float(cosine_loss_paper(e, 3 * e)) < 1e-6
        True
    """
    _check_same("eps", eps, "eps_pred", eps_pred)
    d_true = frame_residual(eps, stride)
    d_pred = frame_residual(eps_pred, stride)
    b, c, n, h, w = d_true.shape
    d_true = d_true.permute(0, 2, 1, 3, 4).reshape(b, n, c * h * w)
    d_pred = d_pred.permute(0, 2, 1, 3, 4).reshape(b, n, c * h * w)
    return (1 - F.cosine_similarity(d_pred, d_true, dim=-1)).mean()


def cosine_loss_official(eps: torch.Tensor, eps_pred: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """The released code's loss: 1 - mean over (B, C, H, W) of cos(|delta eps_theta|, |delta eps|) along frames.

    It differs from eq. 17 in two ways: both residuals are taken in absolute value, and the cosine runs along
    the frame axis at each (batch, channel, pixel) rather than over (C, H, W) per frame pair.

    Example:
        >>> e = torch.randn(1, 3, 4, 8, 8)
        >>> float(cosine_loss_official(e, -e)) < 1e-6  # absolute values make the sign irrelevant
        True
    """
    _check_same("eps", eps, "eps_pred", eps_pred)
    d_true = frame_residual(eps, stride).abs()
    d_pred = frame_residual(eps_pred, stride).abs()
    return 1 - F.cosine_similarity(d_pred, d_true, dim=FRAME_DIM).mean()


def weighted_l2_loss(
    eps: torch.Tensor, eps_pred: torch.Tensor, abar: torch.Tensor | float, stride: int = 1
) -> torch.Tensor:
    """Motion-vector l2 alignment (eq. 16) written on epsilon residuals.

    Returns the batch mean of (1 - abar_t) / abar_t * ||delta eps - delta eps_theta||^2 / D, where D is the
    number of elements of one sample's residual, which equals mean ||delta v_0 - delta vhat_0(t)||^2 / D.

    Example:
        >>> e = torch.randn(2, 3, 4, 8, 8)
        >>> float(weighted_l2_loss(e, e, torch.tensor([0.3, 0.9])))
        0.0
    """
    _check_same("eps", eps, "eps_pred", eps_pred)
    diff = frame_residual(eps, stride) - frame_residual(eps_pred, stride)
    per_sample = diff.pow(2).flatten(1).mean(dim=1)
    weight = l2_weight(torch.as_tensor(abar, dtype=per_sample.dtype, device=per_sample.device))
    weight = weight.expand_as(per_sample)
    return (weight * per_sample).mean()


def epsilon_mse_loss(eps: torch.Tensor, eps_pred: torch.Tensor) -> torch.Tensor:
    """Plain epsilon matching ||eps - eps_theta||^2 (the usual diffusion loss; the ablation baseline).

    Example:
        >>> e = torch.randn(1, 3, 2, 4, 4)
        >>> float(epsilon_mse_loss(e, e))
        0.0
    """
    _check_same("eps", eps, "eps_pred", eps_pred)
    return F.mse_loss(eps_pred, eps)


def motion_distillation_loss(
    eps: torch.Tensor,
    eps_pred: torch.Tensor,
    *,
    loss: str = "cos",
    cos_variant: str = "official",
    stride: int = 1,
    abar: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """The loss named by a `MotionDistillationConfig` (`loss`, `cos_variant`, `frame_stride`).

    Args:
        eps: the true noise (B, C, F, H, W).
        eps_pred: the predicted epsilon, same shape.
        loss: "cos", "l2" or "eps_mse".
        cos_variant: "official" or "paper", for `loss="cos"`.
        stride: the frame stride c.
        abar: alphas_cumprod at each sample's timestep; required for `loss="l2"`.

    Example:
        >>> e = torch.randn(1, 3, 4, 8, 8)
        >>> float(motion_distillation_loss(e, e, loss="cos", cos_variant="paper")) < 1e-6
        True
    """
    if loss == "cos":
        fns: dict[str, Callable[..., torch.Tensor]] = {"paper": cosine_loss_paper, "official": cosine_loss_official}
        if cos_variant not in fns:
            raise ValueError(f"cos_variant={cos_variant!r} is not supported: use 'paper' or 'official'.")
        return fns[cos_variant](eps, eps_pred, stride)
    if loss == "l2":
        if abar is None:
            raise ValueError("loss='l2' needs abar (alphas_cumprod at the sampled timesteps) for its weight.")
        return weighted_l2_loss(eps, eps_pred, abar, stride)
    if loss == "eps_mse":
        return epsilon_mse_loss(eps, eps_pred)
    raise ValueError(f"loss={loss!r} is not supported: use 'cos', 'l2' or 'eps_mse'.")


def _per_sample(abar: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(abar, dtype=like.dtype, device=like.device)
    if a.ndim == 0:
        return a
    if a.ndim != 1 or a.shape[0] != like.shape[0]:
        raise ValueError(f"abar has shape {tuple(a.shape)}; expected a scalar or ({like.shape[0]},), one per sample.")
    return a.view(-1, *([1] * (like.ndim - 1)))


def _check_video(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 5:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a video tensor (B, C, F, H, W); got {shape}.")


def _check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    _check_video(name_a, a)
    _check_video(name_b, b)
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has {tuple(b.shape)}; they must match.")
