import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import run_unet, tiny_unet3d, tiny_unet_motion

from motion_adapters.injection import adapter_infos, adapter_parameters, inject_temporal_adapter, unload_adapter
from motion_adapters.serialization import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    MotionFileError,
    apply_motion_adapter,
    load_motion_adapter,
    motion_from_unet,
    save_motion_adapter,
)


def _train_fake(unet, mode, seed=5, **kwargs):
    info = inject_temporal_adapter(unet, mode=mode, r=4, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(unet, info.adapter_name).values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return info


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("make", [tiny_unet3d, tiny_unet_motion])
def test_save_load_round_trip_reproduces_the_adapted_model(tmp_path, mode, make):
    trained = make()
    _train_fake(trained, mode)
    expected = run_unet(trained)
    noise = torch.randn(1, 4, 4, 8, 8)
    save_motion_adapter(
        motion_from_unet(trained, distillation={"loss": "cos"}, training={"prompt": "a cat"}, noise_prior=noise),
        tmp_path / "m",
    )
    fresh = make()
    base = run_unet(fresh)
    assert not torch.allclose(base, expected)
    motion = load_motion_adapter(tmp_path / "m")
    torch.testing.assert_close(motion.noise_prior, noise)
    assert motion.training == {"prompt": "a cat"} and motion.info.mode == mode
    apply_motion_adapter(fresh, motion)
    torch.testing.assert_close(run_unet(fresh), expected, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in fresh.parameters())
    unload_adapter(fresh)
    torch.testing.assert_close(run_unet(fresh), base, rtol=1e-6, atol=1e-6)


def test_files_hold_only_adapter_tensors_with_config_metadata(tmp_path):
    unet = tiny_unet3d()
    info = _train_fake(unet, "full")
    save_motion_adapter(motion_from_unet(unet), tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert set(tensors) == {f"unet.{n}.weight" for n in info.module_names}
    sidecar = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert sidecar["adapter"]["backbone"] == "UNet3DConditionModel"
    assert sidecar["adapter"]["num_parameters"] == sum(t.numel() for t in tensors.values())
    assert not list(tmp_path.glob("*.tmp"))


def test_full_adapter_scale_interpolates_the_delta(tmp_path):
    trained = tiny_unet3d()
    _train_fake(trained, "full")
    save_motion_adapter(motion_from_unet(trained), tmp_path)
    full, base = run_unet(trained), run_unet(tiny_unet3d())
    half = tiny_unet3d()
    apply_motion_adapter(half, load_motion_adapter(tmp_path), scale=0.0)
    torch.testing.assert_close(run_unet(half), base, rtol=1e-5, atol=1e-6)


def test_low_rank_compression_reports_error_and_loads_as_lora(tmp_path):
    trained = tiny_unet3d()
    info = _train_fake(trained, "full")
    motion = motion_from_unet(trained, compress_rank=64)  # >= every matrix's rank: lossless
    assert motion.info.mode == "lora" and motion.training["compression"]["relative_error"] < 1e-5
    save_motion_adapter(motion, tmp_path)
    fresh = tiny_unet3d()
    apply_motion_adapter(fresh, load_motion_adapter(tmp_path))
    torch.testing.assert_close(run_unet(fresh), run_unet(trained), rtol=1e-4, atol=1e-5)
    lossy = motion_from_unet(trained, compress_rank=1)
    assert 0.05 < lossy.training["compression"]["relative_error"] < 1.0
    assert lossy.info.num_parameters < info.num_parameters


def test_adapter_for_another_backbone_is_refused(tmp_path):
    unet = tiny_unet3d()
    _train_fake(unet, "lora")
    save_motion_adapter(motion_from_unet(unet), tmp_path)
    with pytest.raises(MotionFileError, match="was trained on a UNet3DConditionModel but this UNet is a UNetMotionModel"):
        apply_motion_adapter(tiny_unet_motion(), load_motion_adapter(tmp_path))


def test_wrong_size_adapter_is_refused_and_leaves_the_model_clean(tmp_path):
    unet = tiny_unet3d()
    _train_fake(unet, "lora")
    save_motion_adapter(motion_from_unet(unet), tmp_path)
    path = tmp_path / WEIGHTS_NAME
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(4, 3)
    save_file(tensors, path, metadata=meta)
    fresh = tiny_unet3d()
    base = run_unet(fresh)
    with pytest.raises(MotionFileError, match=r"has shape \(4, 3\) but the model expects"):
        apply_motion_adapter(fresh, load_motion_adapter(tmp_path))
    assert adapter_infos(fresh) == {}
    torch.testing.assert_close(run_unet(fresh), base)


def test_corrupt_and_missing_files_get_clear_errors(tmp_path):
    with pytest.raises(MotionFileError, match="no motion_adapter.safetensors at"):
        load_motion_adapter(tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(MotionFileError, match="is not a readable safetensors file"):
        load_motion_adapter(tmp_path)
    save_file({"unet.a.weight": torch.zeros(2, 2)}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(MotionFileError, match="has no 'motion_adapters' metadata"):
        load_motion_adapter(tmp_path)


def test_lora_motion_from_animatediff_unet_loads_with_diffusers_load_lora_weights(tmp_path):
    from diffusers import AnimateDiffPipeline, AutoencoderKL, DDIMScheduler

    unet = tiny_unet_motion()
    _train_fake(unet, "lora")
    expected = run_unet(unet)
    save_motion_adapter(motion_from_unet(unet), tmp_path)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    pipe = AnimateDiffPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=tiny_unet_motion(),
                               motion_adapter=None, scheduler=DDIMScheduler())
    pipe.load_lora_weights(tmp_path, weight_name=WEIGHTS_NAME, adapter_name="motion")
    torch.testing.assert_close(run_unet(pipe.unet), expected, rtol=1e-5, atol=1e-6)
