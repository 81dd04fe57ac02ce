import numpy as np
import pytest
import torch

from motion_adapters.metrics import track_object
from motion_adapters.video import load_video
from motion_adapters.world import (
    BACKGROUNDS,
    COLORS,
    MOTIONS,
    SHAPES,
    SPEEDS,
    TRAIN_MOTIONS,
    UNSEEN_MOTIONS,
    ClipSpec,
    appearance_invariant_prompt,
    make_dataset,
    motion_path,
    parse_caption,
    render_background,
    render_clip,
    sample_spec,
    shape_area,
    shape_coverage,
    write_clip,
)


def test_vocabulary_covers_the_brief():
    assert {"circle", "square", "triangle", "star"} <= set(SHAPES)
    assert len(COLORS) >= 6 and len(BACKGROUNDS) >= 5
    assert {b.kind for b in BACKGROUNDS.values()} >= {"plain", "checkered", "striped"}
    directions = {"left", "right", "up", "down", "up-left", "up-right", "down-left", "down-right"}
    assert directions | {"still", "growing", "shrinking"} <= set(TRAIN_MOTIONS)
    assert len(UNSEEN_MOTIONS) >= 3 and not set(UNSEEN_MOTIONS) & set(TRAIN_MOTIONS)
    assert {"slowly", "normal", "quickly"} == set(SPEEDS)


def test_captions_read_naturally():
    spec = ClipSpec("circle", "red", "blue", "left", start=(0.7, 0.5))
    assert spec.caption == "a red circle moving left on a blue background"
    assert spec.appearance_invariant_prompt == "a red circle moving left"
    spec = ClipSpec("star", "orange", "checkered", "up-right", "quickly", 0.3, (0.3, 0.7))
    assert spec.caption == "an orange star moving up and to the right quickly on a checkered background"
    assert ClipSpec("square", "white", "gray", "still").caption == "a white square staying still on a gray background"


@pytest.mark.parametrize("motion", MOTIONS)
def test_parse_caption_inverts_caption_for_every_motion_and_speed(motion):
    for speed in ("normal",) if motion == "still" else SPEEDS:
        spec = sample_spec(0, motions=(motion,), speeds=(speed,))
        parsed = parse_caption(spec.caption)
        assert parsed == {k: getattr(spec, k) for k in ("shape", "color", "motion", "speed", "background")}
        assert parse_caption(spec.appearance_invariant_prompt)["background"] is None
        assert appearance_invariant_prompt(spec.caption) == spec.appearance_invariant_prompt


def test_parse_caption_rejects_other_grammar():
    with pytest.raises(ValueError, match="does not read 'a <color> <shape> <motion>"):
        parse_caption("a red circle dancing on a blue background")
    with pytest.raises(ValueError, match="names color 'teal'"):
        parse_caption("a teal circle moving left on a blue background")


def test_same_seed_gives_identical_dataset_and_other_seed_differs():
    first, second, other = make_dataset(6, seed=3), make_dataset(6, seed=3), make_dataset(6, seed=4)
    for (v1, c1, s1), (v2, c2, s2) in zip(first, second):
        torch.testing.assert_close(v1, v2, rtol=0, atol=0)
        assert c1 == c2 and s1 == s2
    assert [c for _, c, _ in first] != [c for _, c, _ in other]


def test_make_dataset_cycles_motions_and_keeps_unseen_motions_out():
    data = make_dataset(2 * len(TRAIN_MOTIONS), seed=0, num_frames=4, height=16, width=16)
    motions = [spec.motion for _, _, spec in data]
    assert motions == list(TRAIN_MOTIONS) * 2
    video, caption, spec = data[0]
    assert video.shape == (3, 4, 16, 16) and video.dtype == torch.float32
    assert caption == spec.caption and -1 <= video.min() and video.max() <= 1
    assert {s.motion for s in [sample_spec(i, motions=UNSEEN_MOTIONS) for i in range(10)]} <= set(UNSEEN_MOTIONS)


def test_sampled_objects_stay_inside_the_frame():
    for seed in range(200):
        spec = sample_spec(seed, motions=MOTIONS)
        radius = spec.sizes(16)[:, None] / 2
        trajectory = spec.trajectory(16)
        assert (trajectory - radius >= -1e-9).all() and (trajectory + radius <= 1 + 1e-9).all(), spec


def test_motion_paths_move_as_named():
    t = np.linspace(0, 1, 8)
    assert (np.diff(motion_path("left", "normal", t)[0][:, 0]) < 0).all()
    assert (np.diff(motion_path("up-right", "normal", t)[0], axis=0) * [1, -1] > 0).all()
    assert np.allclose(motion_path("still", "normal", t)[0], 0)
    assert (np.diff(motion_path("growing", "normal", t)[1]) > 0).all()
    assert (np.diff(motion_path("shrinking", "normal", t)[1]) < 0).all()
    circle = motion_path("circling", "quickly", np.array([0.0, 1.0]))[0]
    assert np.allclose(circle[0], circle[1])
    slow, quick = (np.linalg.norm(motion_path("down", s, np.ones(1))[0]) for s in ("slowly", "quickly"))
    assert quick > slow > 0


def test_trajectory_is_exact_for_a_known_spec():
    spec = ClipSpec("square", "yellow", "black", "down-right", "normal", 0.3, (0.3, 0.3))
    step = 0.3 / np.sqrt(2)
    np.testing.assert_allclose(spec.trajectory(2), [[0.3, 0.3], [0.3 + step, 0.3 + step]])
    np.testing.assert_allclose(spec.trajectory(1), [[0.3, 0.3]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape": "hexagon"}, "shape must be one of .*got 'hexagon'"),
        ({"color": "blue", "background": "blue"}, "color 'blue' does not stand out on background 'blue'"),
        ({"motion": "still", "speed": "quickly"}, "speed must be 'normal' for a still object, got 'quickly'"),
        ({"size": 0}, "size must be in \\(0, 1\\]"),
        ({"start": (0.1, 0.5)}, "leave the frame. Pass a start with x in \\[0.475, 0.825\\]"),
        ({"speed": "quickly", "size": 0.9}, "leave the frame. Pass a smaller size or a slower speed"),
    ],
)
def test_invalid_specs_raise_with_a_fix(kwargs, message):
    arguments = {"shape": "circle", "color": "red", "background": "gray", "motion": "left", **kwargs}
    with pytest.raises(ValueError, match=message):
        ClipSpec(**arguments)


def test_rendered_centroid_follows_the_trajectory():
    for seed in range(12):
        spec = sample_spec(seed, motions=MOTIONS)
        for height, width in ((32, 32), (40, 64)):
            video = render_clip(spec, 8, height, width)
            tracked = track_object(video, background=render_background(spec.background, height, width))
            assert np.abs(tracked - spec.trajectory(8)).max() < 0.01, spec


def test_shape_area_matches_rendered_coverage():
    for shape in SHAPES:
        coverage = shape_coverage(shape, (32.0, 32.0), 40.0, 64, 64, supersample=8)
        assert coverage.sum() == pytest.approx(shape_area(shape) * 40**2, rel=0.01)


def test_backgrounds_render_their_palettes():
    for name, background in BACKGROUNDS.items():
        image = ((render_background(name, 32, 32) + 1) * 127.5).round().permute(1, 2, 0).reshape(-1, 3)
        assert {tuple(c) for c in image.int().tolist()} == set(background.colors)
    striped = render_background("striped", 32, 32)
    assert (striped == striped[:, :, :1]).all()  # horizontal stripes: rows are constant


def test_write_clip_round_trips_through_gif(tmp_path):
    spec = sample_spec(5, motions=UNSEEN_MOTIONS)
    path = write_clip(spec, tmp_path / "clip.gif", num_frames=8, height=32, width=32)
    torch.testing.assert_close(load_video(path, num_frames=8), render_clip(spec), atol=1.01 / 127.5, rtol=0)
    assert load_video(write_clip(spec, tmp_path / "clip.mp4"), num_frames=8).shape == (3, 8, 32, 32)
