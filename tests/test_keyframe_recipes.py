"""benchmarks/keyframe_recipes.py: one variant end to end on the CPU (a pretraining process, its record)."""

import json

import pytest
from scripts import load_script


@pytest.fixture(scope="module")
def recipes():
    return load_script("benchmarks/keyframe_recipes.py")


def test_one_variant_trains_in_its_own_process_and_is_recorded(recipes, tmp_path):
    out = tmp_path / "recipes.json"
    report = recipes.main(["--out", str(out), "--variants", "head_dim_8", "--minutes", "0.01", "--max-steps", "1",
                           "--tiny", "--eval-samples", "0", "--num-specs", "16", "--workers", "1"])  # fmt: skip
    row = report["variants"]["head_dim_8"]
    assert "error" not in row, row.get("error")
    assert row["steps"] == 1 and row["weighting"] == "min-snr" and "--attention-head-dim 8" in row["command"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))


def test_unknown_variant_is_refused_with_the_known_names(recipes, tmp_path):
    with pytest.raises(SystemExit, match="shipped_recipe"):
        recipes.main(["--out", str(tmp_path / "x.json"), "--variants", "bogus"])
