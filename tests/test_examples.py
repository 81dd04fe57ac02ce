"""Smoke tests: each example runs on tiny or embedded models, as the docs show it."""

from pathlib import Path

import pytest
from scripts import load_script

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    return load_script(f"examples/{name}.py")


@pytest.mark.parametrize("backbone", ["animatediff", "zeroscope"])
def test_train_example_runs_on_tiny_models(tmp_path, backbone, capsys):
    assert load("train_animatediff").main(["--tiny", "--backbone", backbone, "--steps", "2", "--out",
                                          str(tmp_path)]) == 0
    assert (tmp_path / "motion_adapter.safetensors").is_file()
    assert f"{backbone}: trained" in capsys.readouterr().out


def test_evaluate_example_scores_same_motion_above_reversed(capsys):
    assert load("evaluate_result").main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    same = float(lines[0].split("trajectory_cosine")[1])
    reversed_ = float(lines[1].split("trajectory_cosine")[1])
    assert same > 0.9 and reversed_ < 0.5


@pytest.mark.slow  # over 30 s on a 2-core CPU: run with -m slow
def test_world_example_learns_and_generates_on_the_default_model(tmp_path, capsys, all_threads):
    assert load("train_and_generate").main(["--out", str(tmp_path), "--steps", "3"]) == 0
    assert (tmp_path / "zigzag.mp4").is_file() and (tmp_path / "motion" / "motion_adapter.safetensors").is_file()
    assert "motion cosine" in capsys.readouterr().out


def test_load_and_combine_example_on_the_default_model(tmp_path, capsys):
    from motion_adapters import MotionDistillationConfig, VMCPipeline
    from motion_adapters.video import load_video

    pipe = VMCPipeline.from_default()
    clip = load_video(EXAMPLES.parent / "motion_adapters/world/assets/examples/zigzag.gif", num_frames=8,
                      size=(32, 32))
    config = MotionDistillationConfig(max_train_steps=2, mode="lora", r=4, checkpointing_steps=0)
    for name, video in (("ahead", clip), ("back", clip.flip(1))):
        pipe.train_motion(video, "a red circle zigzagging", config, adapter_name=name,
                          output_dir=tmp_path / name, invert=False, progress=False)
    code = load("load_and_combine").main([str(tmp_path / "ahead"), str(tmp_path / "back"), "--weights", "1",
                                          "0.5", "--prompt", "a yellow square", "--stages", "keyframes", "--steps",
                                          "2", "-o", str(tmp_path / "out.gif")])
    assert code == 0 and (tmp_path / "out.gif").is_file()
    assert "active motions: {'ahead': 1.0, 'back': 0.5}" in capsys.readouterr().out
