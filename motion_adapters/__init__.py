"""motion_adapters: learn a motion from one video into a video model's temporal attention (VMC), and share it."""

from motion_adapters.config import MotionDistillationConfig
from motion_adapters.injection import (
    AdapterInfo,
    adapter_infos,
    adapter_parameters,
    adapter_state_dict,
    inject_temporal_adapter,
    merge_adapter,
    set_adapter_scales,
    unload_adapter,
)
from motion_adapters.inversion import ddim_invert
from motion_adapters.losses import (
    cosine_loss_official,
    cosine_loss_paper,
    epsilon_from_output,
    epsilon_mse_loss,
    frame_residual,
    motion_distillation_loss,
    split_epsilon,
    tweedie_x0,
    weighted_l2_loss,
)
from motion_adapters.pipelines.vmc import VMCPipeline
from motion_adapters.prompts import appearance_invariant_prompt
from motion_adapters.serialization import (
    MotionAdapter,
    MotionFileError,
    apply_motion_adapter,
    load_motion_adapter,
    motion_from_unet,
    save_motion_adapter,
)
from motion_adapters.targets import BackboneTargets, register_backbone, resolve_target
from motion_adapters.training import NonFiniteLossError, TrainingResult, TrainState, train_motion

__version__ = "0.1.0"

__all__ = [
    "AdapterInfo",
    "BackboneTargets",
    "MotionAdapter",
    "MotionDistillationConfig",
    "MotionFileError",
    "NonFiniteLossError",
    "TrainState",
    "TrainingResult",
    "VMCPipeline",
    "__version__",
    "adapter_infos",
    "adapter_parameters",
    "adapter_state_dict",
    "appearance_invariant_prompt",
    "apply_motion_adapter",
    "cosine_loss_official",
    "cosine_loss_paper",
    "ddim_invert",
    "epsilon_mse_loss",
    "frame_residual",
    "inject_temporal_adapter",
    "load_motion_adapter",
    "merge_adapter",
    "motion_distillation_loss",
    "motion_from_unet",
    "register_backbone",
    "resolve_target",
    "save_motion_adapter",
    "set_adapter_scales",
    "epsilon_from_output",
    "split_epsilon",
    "train_motion",
    "tweedie_x0",
    "unload_adapter",
    "weighted_l2_loss",
]
