import argparse
import json
import sys

import pytest
from test_metrics_clip import PROMPT, save_tiny_clip

from motion_adapters import cli, cli_commands
from motion_adapters.cli_eval import add_eval_command
from motion_adapters.metrics import clip_scores
from motion_adapters.metrics.clip_scores import CLIPLoadError, load_clip, temporal_consistency, text_alignment
from motion_adapters.metrics.evaluation import evaluate
from motion_adapters.video import save_video
from motion_adapters.world import ClipSpec, render_clip

REFERENCE_SPEC = ClipSpec("circle", "red", "black", "up-right", start=(0.35, 0.65))
GENERATED_SPEC = ClipSpec("square", "yellow", "gray", "up-right", start=(0.35, 0.65))  # same motion, new look
KEYFRAMES = [0, 4, 8, 12, 16, 20, 24, 28]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def clips():
    """A 29-frame "cascaded output" and the 8-frame clip its motion was learned from."""
    return render_clip(GENERATED_SPEC, num_frames=29, height=48, width=48), render_clip(REFERENCE_SPEC, 8, 48, 48)


@pytest.fixture
def no_default_clip(monkeypatch, tmp_path):
    """Make the default CLIP model absent, whatever this machine's Hugging Face cache holds."""
    monkeypatch.setattr(clip_scores, "DEFAULT_CLIP_MODEL", str(tmp_path / "no-default-clip"))


@pytest.fixture
def run_cli(monkeypatch):
    """`motion-adapters` main() with `eval` registered (until cli_commands.add_commands registers it itself)."""
    original = cli_commands.add_commands

    def add_commands(sub):
        original(sub)
        if "eval" not in sub.choices:
            add_eval_command(sub)

    monkeypatch.setattr(cli_commands, "add_commands", add_commands)
    return cli.main


def test_evaluate_reports_clip_figures_on_keyframes_and_flow_against_the_reference(clips, tiny_clip_dir):
    generated, reference = clips
    model, processor = load_clip(tiny_clip_dir)
    report = evaluate(generated, reference, PROMPT, clip_model=str(tiny_clip_dir))
    json.dumps(report, allow_nan=False)
    assert report["frame_selection"] == "keyframes" and report["frame_indices"] == KEYFRAMES
    assert report["text_alignment"] == pytest.approx(text_alignment(generated, PROMPT, model, processor), abs=1e-6)
    assert report["temporal_consistency"] == pytest.approx(temporal_consistency(generated, model, processor), abs=1e-6)
    assert report["clip_model"] == str(tiny_clip_dir)
    assert report["generated"] == {"num_frames": 29, "height": 48, "width": 48, "source": "Tensor"}
    assert report["reference"]["num_frames"] == 8 and report["flow_num_frames"] == 8
    assert report["flow_cosine"] > 0.8 and report["trajectory_cosine"] > 0.9  # same motion, other object
    assert not [key for key in report if key.endswith("unavailable")]

    everything = evaluate(generated, reference, PROMPT, clip_model=(model, processor), frame_indices="all")
    assert everything["frame_indices"] == list(range(29))
    assert everything["text_alignment"] == pytest.approx(
        text_alignment(generated, PROMPT, model, processor, frame_indices="all"), abs=1e-6
    )
    backwards = evaluate(generated.flip(1), reference, clip_model=model)
    assert backwards["flow_cosine"] < 0 and backwards["trajectory_cosine"] < 0  # reversed motion scores low
    assert backwards["text_alignment"] is None and backwards["text_alignment_unavailable"] == "no prompt given"


def test_evaluate_without_a_clip_model_or_reference_reports_why_figures_are_null(clips, no_default_clip):
    report = evaluate(clips[0], prompt=PROMPT)
    json.dumps(report, allow_nan=False)
    assert report["text_alignment"] is None and report["temporal_consistency"] is None
    assert "no CLIP model was named" in report["clip_unavailable"] and "--clip-model" in report["clip_unavailable"]
    assert report["flow_cosine"] is None and report["flow_unavailable"] == "no reference clip given"
    assert report["generated"]["num_frames"] == 29 and report["reference"] is None


def test_evaluate_without_opencv_reports_flow_unavailable(clips, no_default_clip, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    report = evaluate(*clips)
    assert report["flow_cosine"] is None and "pip install motion_adapters[metrics]" in report["flow_unavailable"]


def test_evaluate_with_one_evaluated_frame_skips_temporal_consistency(clips, tiny_clip_dir):
    report = evaluate(clips[0], prompt=PROMPT, clip_model=tiny_clip_dir, frame_indices=[5])
    assert report["frame_selection"] == "custom" and report["frame_indices"] == [5]
    assert report["temporal_consistency"] is None
    assert report["temporal_consistency_unavailable"] == "needs at least 2 evaluated frames, got 1"
    assert isinstance(report["text_alignment"], float)


def test_evaluate_raises_when_a_named_clip_model_does_not_load(clips, tmp_path):
    with pytest.raises(CLIPLoadError, match="could not load CLIP model .*not-a-clip"):
        evaluate(clips[0], clip_model=str(tmp_path / "not-a-clip"))
    with pytest.raises(ValueError, match="generated is a batch of 2 clips"):
        evaluate(clips[0][None].expand(2, -1, -1, -1, -1))


def test_cli_eval_prints_json_and_writes_json_out(clips, tiny_clip_dir, tmp_path, run_cli, capsys):
    generated, reference = clips
    gen_path, ref_path = save_video(generated, tmp_path / "gen.gif"), save_video(reference, tmp_path / "ref.gif")
    out = tmp_path / "reports" / "eval.json"
    argv = ["eval", str(gen_path), "--reference", str(ref_path), "--prompt", PROMPT,
            "--clip-model", str(tiny_clip_dir), "--json-out", str(out)]  # fmt: skip
    assert run_cli(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    assert printed["generated"]["source"] == str(gen_path) and printed["frame_indices"] == KEYFRAMES
    assert printed["trajectory_cosine"] > 0.9 and isinstance(printed["text_alignment"], float)

    assert run_cli(["eval", str(gen_path), "--clip-model", str(tiny_clip_dir), "--all-frames"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["frame_selection"] == "all" and printed["flow_unavailable"] == "no reference clip given"


def test_cli_eval_without_clip_model_notes_it_on_stderr(clips, tmp_path, run_cli, capsys, no_default_clip):
    gen_path = save_video(clips[0], tmp_path / "gen.gif")
    assert run_cli(["eval", str(gen_path)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["text_alignment"] is None
    assert "motion-adapters eval: note: no CLIP model was named" in captured.err


def test_cli_eval_missing_file_exits_1_naming_it(tmp_path, run_cli, capsys):
    missing = tmp_path / "nowhere.mp4"
    assert run_cli(["eval", str(missing)]) == 1
    assert f"motion-adapters eval: error: {missing} does not exist" in capsys.readouterr().err


def test_cli_eval_unloadable_clip_model_exits_1_with_a_clear_message(clips, tmp_path, run_cli, capsys):
    gen_path = save_video(clips[0], tmp_path / "gen.gif")
    (tmp_path / "empty").mkdir()
    assert run_cli(["eval", str(gen_path), "--clip-model", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "motion-adapters eval: error: could not load CLIP model" in err and "config.json" in err


def test_add_eval_command_parses_the_documented_options():
    parser = argparse.ArgumentParser()
    add_eval_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "g.mp4", "--reference", "r.mp4", "--prompt", "p", "--clip-model", "m",
                              "--all-frames", "--json-out", "o.json"])  # fmt: skip
    assert (args.generated, args.reference, args.prompt, args.clip_model) == ("g.mp4", "r.mp4", "p", "m")
    assert args.all_frames and args.json_out == "o.json" and args.func.__name__ == "cmd_eval"
