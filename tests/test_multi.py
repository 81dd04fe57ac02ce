"""Many motions over several processes: every item done exactly once, reruns skip finished items."""

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from motion_adapters.multi import DONE, ManifestItem, generate_many, read_manifest, run_items, shard


def write_clip(folder: Path, shift: int) -> Path:
    """Four 8x8 PNG frames of a square moving by `shift` pixels a frame."""
    folder.mkdir(parents=True)
    for f in range(4):
        frame = np.zeros((8, 8, 3), np.uint8)
        frame[2:5, (f * shift) % 5 : (f * shift) % 5 + 3] = 255
        Image.fromarray(frame).save(folder / f"{f}.png")
    return folder


def _worker(rank: int, world: int, port: int, manifest: str, out: str, log: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from accelerate import PartialState
    from diffusers import DDPMScheduler, UNet3DConditionModel

    from motion_adapters.config import MotionDistillationConfig
    from motion_adapters.multi import train_many

    state = PartialState(cpu=True)
    config = MotionDistillationConfig(max_train_steps=2, num_frames=4, checkpointing_steps=0)
    torch.manual_seed(0)
    unet = UNet3DConditionModel(  # tiny_models.tiny_unet3d, on RGB clips
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), layers_per_block=1, cross_attention_dim=16,
        attention_head_dim=8, norm_num_groups=4, sample_size=8, in_channels=3, out_channels=3,
    )
    parts = dict(unet=unet, noise_scheduler=DDPMScheduler(num_train_timesteps=1000),
                 encode_prompt=lambda prompt: torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(0)),
                 config=config, state=state)
    runs = []
    for phase in range(3):
        if phase == 2:
            if state.is_main_process:  # a crash after item 1 finished training but before its DONE marker
                (Path(out) / "clip1" / DONE).unlink()
            state.wait_for_everyone()
        result = train_many(manifest, out, **parts)
        runs.append({"done": result.done, "skipped": result.skipped})
    Path(log, f"rank{rank}.json").write_text(json.dumps(runs))
    state.destroy_process_group()


def test_two_processes_train_every_item_exactly_once_and_reruns_skip(tmp_path):
    clips = [write_clip(tmp_path / "clips" / f"clip{i}", shift=i + 1) for i in range(5)]
    manifest = tmp_path / "motions.json"
    manifest.write_text(json.dumps([{"clip": f"clips/{c.name}", "prompt": f"a square moves {i}"}
                                    for i, c in enumerate(clips)]))
    out, log = tmp_path / "motions", tmp_path / "log"
    log.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, str(manifest), str(out), str(log)), nprocs=2, join=True,
                       start_method="spawn")
    runs = [json.loads((log / f"rank{r}.json").read_text()) for r in range(2)]
    first = [name for rank in runs for name in rank[0]["done"]]
    assert sorted(first) == [f"clip{i}" for i in range(5)] and len(set(first)) == 5
    assert runs[0][0]["done"] == ["clip0", "clip2", "clip4"] and runs[1][0]["done"] == ["clip1", "clip3"]
    assert all(rank[1]["done"] == [] for rank in runs)
    assert sorted(n for rank in runs for n in rank[1]["skipped"]) == sorted(first)
    assert runs[1][2]["done"] == ["clip1"] and runs[0][2]["done"] == []
    for i in range(5):
        folder = out / f"clip{i}"
        marker = json.loads((folder / DONE).read_text())
        assert marker["index"] == i and marker["process_index"] == i % 2 and marker["steps"] == 2
        assert any(folder.glob("*.safetensors")) and not (folder / "checkpoint").exists()
    assert not list(out.glob(".partial-*"))


def test_manifest_forms_and_their_errors(tmp_path):
    (tmp_path / "walk.mp4").write_bytes(b"")
    (tmp_path / "walk.txt").write_text("a seagull is walking\n")
    (tmp_path / "wave").mkdir()
    (tmp_path / "wave.txt").write_text("a person is waving")
    items = read_manifest(tmp_path)
    assert [(i.name, i.prompt) for i in items] == [("walk", "a seagull is walking"), ("wave", "a person is waving")]
    assert items[0].clip == str(tmp_path / "walk.mp4")
    csv_file = tmp_path / "m.csv"
    csv_file.write_text('clip,prompt,name,config\nwalk.mp4,a seagull is walking,gull,"{""max_train_steps"": 5}"\n')
    (item,) = read_manifest(csv_file)
    assert (item.name, item.config) == ("gull", {"max_train_steps": 5})
    gen = read_manifest([{"prompt": "A penguin, walking!"}, {"prompt": "x", "motion": "gull"}], "generate")
    assert [g.name for g in gen] == ["0000-a-penguin-walking", "0001-x"] and gen[1].motion == "gull"
    with pytest.raises(ValueError, match=r"clip wave2 has no prompt file wave2.txt"):
        (tmp_path / "wave2").mkdir()
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match=r"manifest item 1 repeats name='a'"):
        read_manifest([{"clip": "a.mp4", "prompt": "p"}, {"clip": "b.mp4", "prompt": "p", "name": "a"}])
    with pytest.raises(ValueError, match=r"name='../x'; names are folder names"):
        read_manifest([{"clip": "a.mp4", "prompt": "p", "name": "../x"}])
    with pytest.raises(ValueError, match=r"unknown MotionDistillationConfig key\(s\): 'learning_rat'"):
        read_manifest([{"clip": "a.mp4", "prompt": "p", "config": {"learning_rat": 1}}])
    with pytest.raises(ValueError, match=r"manifest item 0 has unknown key\(s\) \['seed'\]"):
        read_manifest([{"clip": "a.mp4", "prompt": "p", "seed": 1}])


def test_shard_splits_by_index():
    items = [ManifestItem(str(n), "p") for n in range(7)]
    assert [[i for i, _ in shard(items, r, 3)] for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match=r"process_index=3 must lie in \[0, num_processes=3\)"):
        shard(items, 3, 3)


def test_failed_item_is_reported_after_the_others_and_retried_on_rerun(tmp_path):
    items = [ManifestItem("a", "p"), ManifestItem("b", "p")]
    calls = []

    def flaky(item, folder, index):
        calls.append(item.name)
        if item.name == "a" and calls.count("a") == 1:
            raise OSError("disk hiccup")
        (folder / "out.txt").write_text(item.name)

    with pytest.raises(RuntimeError, match=r"failed on 1 item\(s\): a: OSError: disk hiccup. Rerun to retry"):
        run_items(items, tmp_path, flaky)
    assert (tmp_path / "b" / DONE).is_file() and not (tmp_path / "a").exists()
    result = run_items(items, tmp_path, flaky)
    assert (result.done, result.skipped, calls) == (["a"], ["b"], ["a", "b", "a"])


class _StubPipeline:
    device = "cpu"

    def __init__(self):
        self.loaded = []

    def load_motion(self, location, adapter_name):
        self.loaded.append(location)
        return adapter_name

    def unload_motion(self, name):
        self.loaded.append(f"unload {name}")

    def __call__(self, prompt, generator, output_type, num_frames=4):
        class Out:
            frames = torch.rand(1, 3, num_frames, 8, 8, generator=generator) * 2 - 1

        return Out()


def test_generate_many_writes_a_video_per_prompt_with_its_motion(tmp_path):
    (tmp_path / "motions" / "gull").mkdir(parents=True)
    pipe = _StubPipeline()
    manifest = [{"prompt": "a penguin is walking", "motion": "gull", "config": {"seed": 3, "num_frames": 3}},
                {"prompt": "a cat", "name": "cat"}]
    result = generate_many(manifest, tmp_path / "videos", pipe, motions_dir=tmp_path / "motions")
    assert result.done == ["0000-a-penguin-is-walking", "cat"]
    assert pipe.loaded == [str(tmp_path / "motions" / "gull"), "unload generate_many"]
    item = json.loads((tmp_path / "videos" / "0000-a-penguin-is-walking" / "item.json").read_text())
    assert item["seed"] == 3 and item["kwargs"] == {"num_frames": 3}
    assert (tmp_path / "videos" / "cat" / "video.mp4").stat().st_size > 0
    assert generate_many(manifest, tmp_path / "videos", pipe).skipped == ["0000-a-penguin-is-walking", "cat"]
