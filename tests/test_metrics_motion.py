import sys

import numpy as np
import pytest
import torch

from motion_adapters.metrics import (
    appearance_check,
    estimate_background_palette,
    flow_fidelity,
    foreground_area,
    track_object,
    trajectory_fidelity,
    video_motion_fidelity,
)
from motion_adapters.video import tensor_to_frames
from motion_adapters.world import BACKGROUNDS, COLORS, MOTIONS, SHAPES, ClipSpec, render_clip, sample_spec

TRANSLATIONS = ("left", "right", "up", "down", "up-left", "up-right", "down-left", "down-right")
RIGHT = np.array([[0.2, 0.5], [0.3, 0.5], [0.4, 0.5], [0.5, 0.5]])


def _restyled(spec: ClipSpec) -> ClipSpec:
    """The same motion with another shape, color and background."""
    shape = "square" if spec.shape != "square" else "circle"
    background = "checkered" if spec.background != "checkered" else "gray"
    color = "yellow" if spec.color != "yellow" else "red"
    return ClipSpec(shape, color, background, spec.motion, spec.speed, spec.size, spec.start)


def test_trajectory_fidelity_same_reversed_and_still():
    same = trajectory_fidelity(RIGHT, RIGHT)
    assert same == {"displacement_cosine": 1.0, "endpoint_error": 0.0, "mean_error": 0.0, "tracked_fraction": 1.0}
    reversed_ = trajectory_fidelity(RIGHT[::-1], RIGHT)
    assert reversed_["displacement_cosine"] == pytest.approx(-1.0)
    assert reversed_["endpoint_error"] == pytest.approx(0.6 / np.sqrt(2))
    still = np.repeat(RIGHT[:1], 4, axis=0)
    assert trajectory_fidelity(still, RIGHT)["displacement_cosine"] == 0.0
    assert trajectory_fidelity(still, still)["displacement_cosine"] == 1.0


def test_trajectory_fidelity_handles_lost_object_and_frame_size():
    lost = RIGHT.copy()
    lost[2] = np.nan
    result = trajectory_fidelity(lost, RIGHT)
    assert result["displacement_cosine"] == pytest.approx(1 / 3)
    assert result["tracked_fraction"] == 0.75 and result["mean_error"] == 0.0
    wide = trajectory_fidelity(RIGHT[::-1], RIGHT, frame_size=(32, 64))
    assert wide["endpoint_error"] == pytest.approx(0.6 * 64 / np.hypot(32, 64))
    with pytest.raises(ValueError, match="must both be \\(F, 2\\), got \\(3, 2\\) and \\(4, 2\\)"):
        trajectory_fidelity(RIGHT[:3], RIGHT)


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_track_object_without_background_follows_known_motion(background):
    for motion in ("still", "down-left", "circling"):
        spec = sample_spec(7, motions=(motion,), backgrounds=(background,))
        assert np.abs(track_object(render_clip(spec)) - spec.trajectory(8)).max() < 0.01, spec


def test_palette_and_area_on_textures():
    spec = ClipSpec("circle", "red", "checkered", "growing", "quickly", 0.25, (0.5, 0.5))
    video = render_clip(spec, height=64, width=64)
    palette = estimate_background_palette(video)
    np.testing.assert_allclose(np.sort(palette[:, 0]), [35, 85], atol=1)
    area = foreground_area(video)
    np.testing.assert_allclose(area, np.pi / 4 * spec.sizes(8) ** 2, rtol=0.03)


@pytest.mark.parametrize("motion", [m for m in MOTIONS if m not in ("still", "growing", "shrinking")])
def test_video_motion_fidelity_same_high_reversed_low(motion):
    spec = sample_spec(11, motions=(motion,))
    reference, generated = render_clip(spec), render_clip(_restyled(spec))
    assert video_motion_fidelity(generated, reference)["displacement_cosine"] > 0.9
    backwards = video_motion_fidelity(generated.flip(1), reference)["displacement_cosine"]
    if motion in TRANSLATIONS:
        assert backwards < -0.9
    elif motion != "bouncing":  # backwards, a zigzag or an orbit is a mirrored path; a bounce is the same bounce
        assert backwards < 0.5


def test_video_motion_fidelity_still_vs_moving_and_growth():
    moving = render_clip(sample_spec(2, motions=("right",)))
    still = render_clip(sample_spec(2, motions=("still",)))
    assert video_motion_fidelity(still, moving)["displacement_cosine"] < 0.2
    grow = ClipSpec("star", "white", "striped", "growing", "normal", 0.25, (0.5, 0.5))
    shrink = ClipSpec("circle", "red", "gray", "shrinking", "normal", 0.45, (0.5, 0.5))
    assert video_motion_fidelity(render_clip(grow), render_clip(grow))["scale_agreement"] == 1.0
    assert video_motion_fidelity(render_clip(shrink), render_clip(grow))["scale_agreement"] == -1.0


@pytest.mark.parametrize("resolution", [32, 64])
def test_appearance_check_is_accurate_for_every_shape_and_color(resolution):
    rng = np.random.default_rng(resolution)
    results = []
    for shape in SHAPES:
        for color in COLORS:
            spec = sample_spec(rng, motions=MOTIONS, shapes=(shape,), colors=(color,))
            results.append(appearance_check(render_clip(spec, 8, resolution, resolution), spec))
    # 100% observed on 300 random clips at each resolution; the threshold leaves room for one miss.
    assert np.mean([r["accuracy"] for r in results]) >= 0.97


def test_appearance_check_reports_each_wrong_attribute():
    spec = ClipSpec("triangle", "purple", "striped", "right", start=(0.3, 0.5))
    video = render_clip(spec, height=64, width=64)
    result = appearance_check(video, "a green triangle moving left on a striped background")
    assert (result["color"], result["shape"], result["background"]) == (False, True, True)
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["predicted"] == {"color": "purple", "shape": "triangle", "background": "striped"}
    assert appearance_check(tensor_to_frames(video), spec)["accuracy"] == 1.0
    with pytest.raises(ValueError, match="names no background"):
        appearance_check(video, "a purple triangle moving right")


def test_flow_fidelity_same_reversed_still_and_resampled():
    spec = ClipSpec("circle", "red", "black", "up-right", start=(0.35, 0.65))
    reference = render_clip(spec, height=48, width=48)
    generated = render_clip(_restyled(spec), height=48, width=48)
    same = flow_fidelity(generated, reference, size=(64, 64))
    assert same["trajectory_cosine"] > 0.9 and same["flow_cosine"] > 0.8
    backwards = flow_fidelity(generated.flip(1), reference, size=(64, 64))
    assert backwards["trajectory_cosine"] < 0 and backwards["flow_cosine"] < 0
    still = render_clip(ClipSpec("circle", "red", "black", "still", start=(0.35, 0.65)), height=48, width=48)
    assert flow_fidelity(still, reference, size=(64, 64)) == {"flow_cosine": 0.0, "trajectory_cosine": 0.0}
    longer = render_clip(spec, num_frames=15, height=48, width=48)
    assert flow_fidelity(longer, reference, size=(64, 64))["trajectory_cosine"] > 0.9


def test_flow_fidelity_without_opencv_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match="pip install motion_adapters\\[metrics\\]"):
        flow_fidelity(torch.zeros(3, 2, 8, 8), torch.zeros(3, 2, 8, 8))
