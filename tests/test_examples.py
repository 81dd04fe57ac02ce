"""Smoke tests: each example runs on tiny or embedded models, as the docs show it."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


@pytest.mark.slow
def test_world_example_runs_end_to_end(tmp_path):
    assert load("train_and_generate").main(["--out", str(tmp_path), "--steps", "5"]) == 0
    assert (tmp_path / "report.json").is_file()
