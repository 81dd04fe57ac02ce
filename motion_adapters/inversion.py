"""DDIM inversion: run the deterministic DDIM sampler backwards to find the initial noise of a clip.

VMC inverts the training clip with the tuned keyframe UNet (empty prompt, no guidance) and starts generation
from the result, so the new video inherits the clip's coarse layout and motion.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from motion_adapters.losses import epsilon_from_output, prediction_type, split_epsilon
from motion_adapters.targets import backbone_targets

SCHEDULES = ("model", "scaled_linear")


def inversion_alphas(noise_scheduler=None, schedule: str = "model") -> torch.Tensor:
    """The alphas_cumprod that DDIM inversion walks along.

    Args:
        noise_scheduler: the backbone's scheduler (its `alphas_cumprod`, or its config's beta schedule).
        schedule: "model" (the backbone's own schedule: the right one, and the default) or "scaled_linear"
            (Stable Diffusion's betas 0.00085 to 0.012, what the released VMC code used with Show-1).

    Example:
        >>> inversion_alphas(schedule="scaled_linear").shape
        torch.Size([1000])
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not supported: use 'model' or 'scaled_linear'.")
    if schedule == "scaled_linear":
        return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    if noise_scheduler is None:
        raise ValueError("schedule='model' needs the backbone's noise_scheduler; pass it or use 'scaled_linear'.")
    alphas = getattr(noise_scheduler, "alphas_cumprod", None)
    if alphas is None:
        alphas = DDIMScheduler.from_config(noise_scheduler.config).alphas_cumprod
    return alphas


@torch.no_grad()
def ddim_invert(
    unet: nn.Module,
    x0: torch.Tensor,
    prompt_embeds: torch.Tensor,
    noise_scheduler=None,
    *,
    num_inference_steps: int = 75,
    schedule: str = "model",
    progress: bool = True,
) -> torch.Tensor:
    """Invert a clean clip to its DDIM initial noise x_T (eta = 0, no guidance).

    For t_i < t_{i+1} along `num_inference_steps` evenly spaced timesteps:
    x_{t_{i+1}} = sqrt(abar_{i+1}) x0_hat + sqrt(1 - abar_{i+1}) eps_theta(x_{t_i}, t_i), with
    x0_hat = (x_{t_i} - sqrt(1 - abar_i) eps_theta) / sqrt(abar_i).

    Args:
        unet: the (tuned) video UNet; evaluated in eval mode, its mode restored afterwards.
        x0: the clip in the UNet's input space, (1, C, F, H, W) (pixels in [-1, 1] for Show-1, scaled VAE
            latents for latent backbones).
        prompt_embeds: (1, L, D) embeddings of the inversion prompt (VMC: the empty prompt).
        noise_scheduler: the backbone's scheduler, for `schedule="model"`.
        num_inference_steps: DDIM steps (75 in VMC).
        schedule: "model" or "scaled_linear"; see `inversion_alphas`.
        progress: show a tqdm bar.

    Returns:
        The inverted noise, shaped like `x0`, float32.

    Example:
        >>> noise = ddim_invert(unet, clip, empty_embeds, scheduler, num_inference_steps=50)  # doctest: +SKIP
    """
    if not isinstance(x0, torch.Tensor) or x0.ndim != 5:
        raise ValueError(f"x0 must be (B, C, F, H, W); got {tuple(x0.shape) if isinstance(x0, torch.Tensor) else x0}.")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps!r} must be a positive int.")
    alphas = inversion_alphas(noise_scheduler, schedule).to(torch.float64)
    timesteps = torch.linspace(0, alphas.numel() - 1, num_inference_steps + 1).round().long().tolist()
    pairs = list(zip(timesteps[:-1], timesteps[1:]))
    return _ddim_walk(
        unet, x0, prompt_embeds, alphas, pairs, desc="ddim_invert", progress=progress,
        prediction=prediction_type(noise_scheduler),
    )  # fmt: skip


@torch.no_grad()
def ddim_sample(
    unet: nn.Module,
    x_t: torch.Tensor,
    prompt_embeds: torch.Tensor,
    noise_scheduler=None,
    *,
    num_inference_steps: int = 75,
    schedule: str = "model",
) -> torch.Tensor:
    """The forward DDIM sampler (eta = 0, no guidance) that `ddim_invert` inverts; used to check inversions.

    Example:
        >>> clip_again = ddim_sample(unet, noise, empty_embeds, scheduler, num_inference_steps=50)  # doctest: +SKIP
    """
    alphas = inversion_alphas(noise_scheduler, schedule).to(torch.float64)
    timesteps = torch.linspace(0, alphas.numel() - 1, num_inference_steps + 1).round().long().tolist()[::-1]
    pairs = list(zip(timesteps[:-1], timesteps[1:]))
    return _ddim_walk(
        unet, x_t, prompt_embeds, alphas, pairs, desc="ddim_sample", progress=False,
        prediction=prediction_type(noise_scheduler),
    )  # fmt: skip


def _ddim_walk(
    unet, x, prompt_embeds, alphas, pairs, *, desc: str, progress: bool, prediction: str = "epsilon"
) -> torch.Tensor:
    """Deterministic DDIM moves from each pair's first timestep to its second (up: inversion, down: sampling).

    `prediction` is the UNet's prediction type; its output is turned into epsilon before each move.
    """
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    in_channels = x.shape[1]
    embeds = prompt_embeds.to(device, dtype)
    try:
        if backbone_targets(unet).text_per_frame:
            embeds = embeds.repeat_interleave(x.shape[2] * x.shape[0], dim=0)
    except ValueError:
        pass
    x = x.to(device, torch.float64)
    was_training = unet.training
    unet.eval()
    try:
        for t_from, t_to in tqdm(pairs, desc=desc, disable=not progress, leave=False):
            t = torch.full((x.shape[0],), t_from, device=device, dtype=torch.long)
            out = split_epsilon(unet(x.to(dtype), t, encoder_hidden_states=embeds).sample, in_channels).double()
            a_from, a_to = alphas[t_from].item(), alphas[t_to].item()
            eps = epsilon_from_output(out, x, a_from, prediction)
            x0_hat = (x - (1 - a_from) ** 0.5 * eps) / a_from**0.5
            x = a_to**0.5 * x0_hat + (1 - a_to) ** 0.5 * eps
    finally:
        unet.train(was_training)
    return x.float()
