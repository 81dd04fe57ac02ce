"""Show-1 stage pipelines and the cascade, as diffusers pipelines."""

from motion_adapters.pipelines._utils import (
    Show1CascadeOutput,
    Show1PipelineOutput,
    combine_guidance,
    scheduler_step_per_frame,
)
from motion_adapters.pipelines.cascade import DEFAULT_STAGE_KWARGS, HUB_IDS, STAGES, Show1CascadePipeline
from motion_adapters.pipelines.show1_base import Show1KeyframesPipeline
from motion_adapters.pipelines.show1_interpolation import Show1InterpolationPipeline, interpolated_num_frames
from motion_adapters.pipelines.show1_superres import (
    Show1SuperResPipeline,
    super_resolve_first_frame,
    super_resolve_video_latent,
    window_starts,
)
from motion_adapters.pipelines.stage import Show1StagePipeline
from motion_adapters.pipelines.vmc import VMCPipeline

__all__ = [
    "DEFAULT_STAGE_KWARGS",
    "HUB_IDS",
    "STAGES",
    "Show1CascadeOutput",
    "Show1CascadePipeline",
    "Show1InterpolationPipeline",
    "Show1KeyframesPipeline",
    "Show1PipelineOutput",
    "Show1StagePipeline",
    "Show1SuperResPipeline",
    "VMCPipeline",
    "combine_guidance",
    "interpolated_num_frames",
    "scheduler_step_per_frame",
    "super_resolve_first_frame",
    "super_resolve_video_latent",
    "window_starts",
]
