import os

import numpy as np
import pytest
import torch
from PIL import Image

from motion_adapters import video as video_module
from motion_adapters.video import (
    VideoError,
    frames_to_tensor,
    load_video,
    natural_sort_key,
    read_frames,
    resize_frame,
    save_video,
    tensor_to_frames,
)


def _solid_frames(values, size=(8, 8)):
    return [np.full((*size, 3), v, dtype=np.uint8) for v in values]


def _write_folder(folder, names_and_values):
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in names_and_values:
        Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(folder / name)
    return folder


@pytest.fixture
def clip():
    torch.manual_seed(0)
    levels = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    return levels[torch.randint(0, 5, (3, 6, 16, 20))]


def test_frames_tensor_round_trip_is_exact(clip):
    frames = tensor_to_frames(clip)
    assert frames.shape == (6, 16, 20, 3) and frames.dtype == np.uint8
    torch.testing.assert_close(frames_to_tensor(list(frames)), ((clip + 1) * 127.5).round() / 127.5 - 1)


def test_gif_round_trip_is_near_lossless_and_keeps_repeated_frames(tmp_path, clip):
    still = torch.cat([clip[:, :2], clip[:, 2:3].expand(-1, 4, -1, -1)], dim=1)  # 4 identical frames at the end
    path = save_video(still, tmp_path / "clip.gif", fps=8)
    loaded = load_video(path, num_frames=6)  # raises if repeated frames were merged
    torch.testing.assert_close(loaded, still, atol=1.5 / 127.5, rtol=0)


def test_mp4_round_trip_is_close(tmp_path):
    smooth = torch.linspace(-0.8, 0.8, 32).view(1, 1, 1, 32).expand(3, 8, 32, 32).contiguous()
    path = save_video(smooth, tmp_path / "clip.mp4", fps=8)
    loaded = load_video(path, num_frames=8)
    assert loaded.shape == (3, 8, 32, 32)
    assert (loaded - smooth).abs().mean() < 0.03


def test_save_video_pads_odd_sizes_for_mp4(tmp_path):
    frames = np.stack(_solid_frames([10, 200, 90], size=(33, 31)))
    path = save_video(frames, tmp_path / "odd.mp4")
    assert read_frames(path)[0].shape == (34, 32, 3)


def test_save_video_accepts_pil_list_and_batched_tensor(tmp_path):
    images = [Image.fromarray(f) for f in _solid_frames([0, 128, 255])]
    assert len(read_frames(save_video(images, tmp_path / "a.gif"))) == 3
    assert len(read_frames(save_video(torch.zeros(1, 3, 2, 8, 8), tmp_path / "b.gif"))) == 2


def test_save_video_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="Pass one clip: video\\[i\\]"):
        save_video(torch.zeros(2, 3, 2, 8, 8), tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="uint8 of shape \\(F, H, W, 3\\)"):
        save_video(np.zeros((2, 8, 8, 3), dtype=np.float32), tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="must end in .mp4 or .gif"):
        save_video(torch.zeros(3, 2, 8, 8), tmp_path / "a.avi")
    with pytest.raises(ValueError, match="not \\[-1, 1\\]"):
        save_video(torch.full((3, 2, 8, 8), 255.0), tmp_path / "a.mp4")


def test_save_video_is_atomic_on_failure(tmp_path, monkeypatch):
    path = save_video(torch.zeros(3, 2, 8, 8), tmp_path / "clip.gif")
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(video_module, "_write_ffmpeg", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_video(torch.ones(3, 2, 8, 8), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["clip.gif"]


def test_natural_sort_orders_numbers_by_value():
    names = ["frame_10.png", "frame_2.png", "frame_1.png", "10.jpg", "2.jpg"]
    assert sorted(names, key=natural_sort_key) == ["2.jpg", "10.jpg", "frame_1.png", "frame_2.png", "frame_10.png"]


def test_folder_is_read_in_natural_order_and_skips_other_files(tmp_path):
    folder = _write_folder(tmp_path / "frames", [("frame_10.png", 30), ("frame_2.png", 20), ("frame_1.jpg", 10)])
    (folder / "notes.txt").write_text("not a frame")
    frames = read_frames(folder)
    assert [int(f[0, 0, 0]) for f in frames] == [10, 20, 30]


def test_load_video_samples_stride_start_and_reverse(tmp_path):
    folder = _write_folder(tmp_path / "f", [(f"{i}.png", 20 * i) for i in range(10)])
    values = lambda v: [round(float(x)) for x in ((v[0, :, 0, 0] + 1) * 127.5)]  # noqa: E731
    assert values(load_video(folder, num_frames=3, stride=2, start=1)) == [20, 60, 100]
    assert values(load_video(folder, num_frames=3, stride=2, start=1, reverse=True)) == [100, 60, 20]
    assert load_video(folder, num_frames=2, dtype=torch.float16).dtype == torch.float16


def test_resize_crop_keeps_center_and_stretch_keeps_everything():
    frame = np.zeros((40, 80, 3), dtype=np.uint8)
    frame[:, :20] = frame[:, 60:] = (255, 0, 0)
    frame[:, 20:60] = (0, 0, 255)
    cropped, stretched = resize_frame(frame, (32, 32), "crop"), resize_frame(frame, (32, 32), "stretch")
    assert cropped[..., 0].max() < 10 and cropped[..., 2].min() > 245
    assert stretched[:, 0, 0].min() > 245 and stretched[:, -1, 0].min() > 245
    assert resize_frame(frame, (20, 60), "crop").shape == (20, 60, 3)


def test_load_video_resizes(tmp_path):
    path = save_video(np.stack(_solid_frames([50] * 4, size=(24, 40))), tmp_path / "wide.gif")
    assert load_video(path, num_frames=4, size=(16, 16)).shape == (3, 4, 16, 16)
    assert load_video(path, num_frames=4, size=(16, 16), resize_mode="stretch").shape == (3, 4, 16, 16)


def test_webm_is_read(tmp_path):
    import imageio_ffmpeg

    path = str(tmp_path / "clip.webm")
    writer = imageio_ffmpeg.write_frames(path, (16, 16), fps=8, codec="libvpx-vp9", macro_block_size=1)
    writer.send(None)
    for frame in _solid_frames([0, 100, 200], size=(16, 16)):
        writer.send(frame)
    writer.close()
    assert load_video(path, num_frames=3).shape == (3, 3, 16, 16)


def test_too_short_clip_names_file_and_counts(tmp_path):
    path = save_video(np.stack(_solid_frames(range(0, 250, 50))), tmp_path / "clip.gif")
    expected = "clip.gif has 5 frames; num_frames=8 with stride=1 and start=0 needs 8. Pass a smaller num_frames"
    with pytest.raises(VideoError, match=expected):
        load_video(path, num_frames=8)
    with pytest.raises(VideoError, match="num_frames=3 with stride=2 and start=1 needs 6"):
        load_video(path, num_frames=3, stride=2, start=1)


def test_missing_empty_and_corrupt_inputs_raise_video_error(tmp_path):
    with pytest.raises(VideoError, match="missing.mp4 does not exist"):
        load_video(tmp_path / "missing.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match="holds no frames"):
        load_video(tmp_path / "empty")
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="noise.mp4 could not be decoded"):
        load_video(noise)
    gif = save_video(np.stack(_solid_frames(range(0, 250, 30), size=(16, 16))), tmp_path / "whole.gif")
    truncated = tmp_path / "truncated.gif"
    truncated.write_bytes(gif.read_bytes()[: len(gif.read_bytes()) // 2])
    with pytest.raises(VideoError, match="truncated.gif could not be read"):
        load_video(truncated, num_frames=8)
    with pytest.raises(VideoError, match="'.txt'"):
        (tmp_path / "a.txt").write_text("x")
        load_video(tmp_path / "a.txt")
    assert issubclass(VideoError, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_frames": 0}, "num_frames must be an int >= 1, got 0"),
        ({"stride": 0}, "stride must be an int >= 1, got 0"),
        ({"start": -1}, "start must be an int >= 0, got -1"),
        ({"resize_mode": "pad"}, "resize_mode must be one of \\('crop', 'stretch'\\), got 'pad'"),
        ({"size": (32,)}, "size must be two positive ints"),
        ({"size": (0, 32)}, "size must be two positive ints"),
        ({"size": (32.0, 32)}, "size must be two positive ints"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(tmp_path, kwargs, message):
    folder = _write_folder(tmp_path / "f", [("0.png", 0), ("1.png", 1)])
    with pytest.raises(ValueError, match=message):
        load_video(folder, **{"num_frames": 2, **kwargs})
