"""The ablation benchmark's bookkeeping: target looks, summaries, merging split runs, and the generated page."""

import math

import pytest
from scripts import load_script

from motion_adapters.world import UNSEEN_MOTIONS, sample_spec

ablation = load_script("benchmarks/ablation_world.py")


@pytest.mark.parametrize("motion", UNSEEN_MOTIONS)
def test_target_look_changes_shape_color_and_background_and_keeps_the_motion(motion):
    source = sample_spec(3, motions=(motion,))
    target = ablation.target_look(source, seed=0)
    assert (target.shape, target.color, target.background) != (source.shape, source.color, source.background)
    assert target.shape != source.shape and target.color != source.color and target.background != source.background
    assert (target.motion, target.speed, target.start, target.size) == (
        source.motion, source.speed, source.start, source.size,
    )  # fmt: skip


def _rows(variant, motion, values):
    return [{"variant": variant, "motion": motion, "seed": i, "displacement_cosine": v, "endpoint_error": 0.1,
             "appearance_accuracy": 1.0} for i, v in enumerate(values)]  # fmt: skip


def test_summary_gives_mean_and_sample_std_over_seeds_and_skips_nan():
    rows = _rows("a", "zigzag", [0.2, 0.4, float("nan")]) + _rows("a", "bouncing", [0.6])
    summary = ablation.summarize(rows, ["a"])
    assert summary["a"]["displacement_cosine"]["mean"] == pytest.approx(0.4)
    assert summary["a"]["displacement_cosine"]["std"] == pytest.approx(0.2)
    assert summary["a"]["displacement_cosine"]["n"] == 3
    assert summary["a"]["per_motion"]["zigzag"]["mean"] == pytest.approx(0.3)
    assert summary["a"]["per_motion"]["bouncing"]["std"] == 0.0
    only_nan = ablation.summarize(_rows("b", "zigzag", [float("nan")]), ["b"])
    assert math.isnan(only_nan["b"]["per_motion"]["zigzag"]["mean"])


def _result(motion, rows, steps=300):
    settings = {"steps": steps, "lr": 1e-3, "seeds": 2, "motions": [motion], "inversion_steps": 75,
                "inference_steps": 25, "guidance_scale": 7.5}  # fmt: skip
    return {"benchmark": "ablation_world", "command": f"run {motion}", "date": "2026-11-24T00:00:00+00:00",
            "environment": {"python": "3.12", "torch": "2.11", "device": "GPU"}, "settings": settings,
            "seconds": 10.0, "rows": rows, "summary": ablation.summarize(rows, ["a"])}  # fmt: skip


def test_merge_joins_runs_split_by_motion_and_refuses_other_settings():
    first = _result("zigzag", _rows("a", "zigzag", [0.2, 0.4]))
    second = _result("circling", _rows("a", "circling", [0.6]))
    merged = ablation.merge([first, second])
    assert merged["settings"]["motions"] == ["zigzag", "circling"] and merged["seconds"] == 20.0
    assert merged["summary"]["a"]["displacement_cosine"]["mean"] == pytest.approx(0.4)
    with pytest.raises(SystemExit, match="settings differ"):
        ablation.merge([first, _result("circling", [], steps=100)])
    page = ablation.table(merged)
    assert "| `a` | 0.400 +- 0.200 | 0.100 +- 0.000 | 1.000 +- 0.000 |" in page
    assert "| variant | zigzag | circling |" in page


def test_each_variant_is_compared_clip_by_clip_with_inversion_only():
    rows = _rows("inversion_only", "zigzag", [0.5, 0.1, 0.3]) + _rows("vmc", "zigzag", [0.9, 0.0, 0.7])
    rows[-1]["appearance_accuracy"] = 0.5
    summary = ablation.summarize(rows, ["inversion_only", "vmc"])
    paired = summary["vmc"]["paired_vs_inversion_only"]
    assert paired["displacement_cosine"]["mean"] == pytest.approx(0.7 / 3, abs=1e-4)  # 0.4, -0.1, 0.4
    assert (paired["displacement_cosine"]["better"], paired["displacement_cosine"]["worse"]) == (2, 1)
    assert (paired["appearance_accuracy"]["better"], paired["appearance_accuracy"]["worse"]) == (0, 1)
    assert "paired_vs_inversion_only" not in summary["inversion_only"]
    result = {**_result("zigzag", rows), "summary": summary}
    page = ablation.table(result, heading="Other run", source="other.json", intro="Why this run.")
    assert page.startswith("# Other run\n") and "results/other.json" in page and "Why this run." in page
    assert "| `vmc` | +0.233 +- 0.289 | 2 / 1 | -0.167 +- 0.289 | 0 / 1 |" in page
