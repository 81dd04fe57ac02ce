import json

import pytest
from fixtures_tiny import tiny_cascade

from motion_adapters.cli import main
from motion_adapters.world import ClipSpec, write_clip


@pytest.fixture(scope="module")
def cascade_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    (root / "tok").mkdir()
    tiny_cascade(root / "tok").save_pretrained(root / "model")
    return root / "model"


def test_train_inspect_generate_round_trip(tmp_path, cascade_dir, capsys):
    clip = write_clip(ClipSpec("square", "red", "blue", "zigzag"), tmp_path / "clip.gif", num_frames=8, height=16,
                      width=24)
    code = main(["train", str(clip), "--prompt", "a red square zigzagging", "--out", str(tmp_path / "m"),
                 "--model", str(cascade_dir), "--steps", "2", "--lr", "1e-3", "--device", "cpu",
                 "--inversion-steps", "4"])
    out = capsys.readouterr().out
    assert code == 0 and "motion saved to" in out and "2 steps" in out
    assert main(["inspect", str(tmp_path / "m"), "--json"]) == 0
    description = json.loads(capsys.readouterr().out)
    assert description["training"]["prompt"] == "a red square zigzagging"
    assert description["training"]["noise_prior_inverted_with"] == "base"
    assert description["noise_prior"] == [1, 3, 8, 40, 64]
    assert main(["inspect", str(tmp_path / "m")]) == 0
    assert "backbone    Show1UNet3DConditionModel" in capsys.readouterr().out
    code = main(["generate", "--motion", str(tmp_path / "m"), "--prompt", "a cat", "-o", str(tmp_path / "o.gif"),
                 "--model", str(cascade_dir), "--stages", "keyframes", "--steps", "2", "--device", "cpu"])
    assert code == 0 and (tmp_path / "o.gif").is_file()


def test_train_takes_the_papers_inversion_order(tmp_path, cascade_dir, capsys):
    clip = write_clip(ClipSpec("square", "red", "blue", "zigzag"), tmp_path / "clip.gif", num_frames=8, height=16,
                      width=24)
    assert main(["train", str(clip), "--prompt", "a red square zigzagging", "--out", str(tmp_path / "m"),
                 "--model", str(cascade_dir), "--steps", "1", "--device", "cpu", "--invert-with", "tuned",
                 "--inversion-steps", "4"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "m"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["training"]["noise_prior_inverted_with"] == "tuned"


def test_missing_motion_exits_1_with_a_message(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing-here")]) == 1
    assert "motion-adapters inspect: error:" in capsys.readouterr().err


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["train"])
    assert info.value.code == 2


@pytest.mark.slow  # about 100 s on a 2-core CPU: the README's main command; run with -m slow
def test_demo_learns_the_zigzag_and_reports_both_generations(tmp_path, capsys, all_threads):
    # the README's main command, with 2 training steps: the whole default cascade runs twice on the CPU
    assert main(["demo", "--out", str(tmp_path), "--steps", "2"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 2 and report["video"] == [3, 29, 96, 96]
    assert set(report["scores"]) == {"reference clip", "without adaptation", "inversion only", "VMC (this library)"}
    assert report["scores"]["reference clip"]["displacement_cosine"] == 1.0
    for name in ("reference.mp4", "unadapted.mp4", "inversion_only.mp4", "vmc.mp4",
                 "motion/motion_adapter.safetensors"):
        assert (tmp_path / name).is_file(), name
    assert "VMC (this library)" in capsys.readouterr().out
