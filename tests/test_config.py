import pytest

from motion_adapters.config import MotionDistillationConfig


def test_defaults_are_the_released_recipe():
    c = MotionDistillationConfig()
    assert (c.loss, c.cos_variant, c.mode, c.target) == ("cos", "official", "full", "temporal_attn.to_[qkv]")
    assert (c.max_train_steps, c.learning_rate, c.max_grad_norm, c.adam_weight_decay) == (400, 1e-4, 1.0, 0.01)
    assert (c.adam_beta1, c.adam_beta2, c.adam_epsilon, c.frame_stride, c.num_frames) == (0.9, 0.999, 1e-8, 1, 8)


def test_json_round_trip_preserves_every_field(tmp_path):
    c = MotionDistillationConfig(loss="l2", mode="lora", r=4, target=["to_q", "to_k"], prompt="a cat is roaring",
                                 max_timestep=900, height=32, width=48, extra={"note": "x"})
    assert MotionDistillationConfig.from_json(c.to_json()) == c
    path = c.save(tmp_path)
    assert path.name == "motion_adapter_config.json"
    assert MotionDistillationConfig.load(tmp_path) == c


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "mse"}, "loss='mse' is not supported: use one of 'cos', 'l2', 'eps_mse'"),
        ({"cos_variant": "x"}, "cos_variant='x' is not supported"),
        ({"mode": "dora"}, "mode='dora' is not supported: use one of 'full', 'lora'"),
        ({"frame_stride": 0}, "frame_stride=0 must be a positive int"),
        ({"num_frames": 2, "frame_stride": 2}, "num_frames=2 leaves no frame pair at frame_stride=2"),
        ({"learning_rate": 0}, "learning_rate=0 must be > 0"),
        ({"adam_beta2": 1.0}, r"adam_beta2=1.0 must lie in \[0, 1\)"),
        ({"max_timestep": 5, "min_timestep": 10}, "max_timestep=5 must be an int > min_timestep=10"),
        ({"target": ""}, "target='' must be a non-empty pattern"),
        ({"mixed_precision": "fp8"}, "mixed_precision='fp8' is not supported"),
    ],
)
def test_invalid_fields_name_the_field_value_and_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MotionDistillationConfig(**kwargs)


def test_unknown_keys_are_rejected_by_name_with_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown MotionDistillationConfig key\(s\): 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        MotionDistillationConfig.from_dict({"learning_rat": 1e-3})
