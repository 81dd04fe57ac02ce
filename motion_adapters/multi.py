"""Train many motions and generate many videos, spread over processes (one per GPU), resumable after a crash.

A manifest lists the work: for training, a clip, its appearance-invariant prompt, an output name and optional
`MotionDistillationConfig` overrides; for generation, a prompt, an output name, an optional motion and optional
pipeline arguments. Items are split by index across the processes of an `accelerate` launch (item i goes to
process i mod N). Each item is built in a hidden partial folder beside its final one and moved into place
with its `DONE` marker, so a rerun after a crash skips finished items and resumes unfinished trainings from
their last checkpoint.

    accelerate launch -m motion_adapters.multi train clips.json motions/
    accelerate launch -m motion_adapters.multi generate prompts.csv videos/ --motions-dir motions/
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from motion_adapters.config import MotionDistillationConfig
from motion_adapters.serialization import atomic_write_text

DONE = "DONE"
PARTIAL_PREFIX = ".partial-"
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ManifestItem:
    """One unit of work.

    Attributes:
        name: the output folder's name (letters, digits, '.', '_', '-').
        prompt: the training prompt, or the prompt to generate.
        clip: the training clip (a video file or a folder of frames); None for generation.
        motion: for generation, a motion folder or Hub id to load first (relative names resolve in the
            `motions_dir` of `generate_many`); None for the plain model.
        config: for training, `MotionDistillationConfig` overrides; for generation, pipeline call arguments
            (`seed` picks the generator seed).
    """

    name: str
    prompt: str
    clip: str | None = None
    motion: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ManyResult:
    """What one process did.

    Attributes:
        done: names this process finished in this call.
        skipped: names of its items that were already finished.
        failed: names of its items that raised, with the error.
        process_index: this process's index.
        num_processes: how many processes shared the manifest.
    """

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    process_index: int = 0
    num_processes: int = 1


def read_manifest(manifest: str | os.PathLike | Sequence[dict], kind: str = "train") -> list[ManifestItem]:
    """Read the items of a manifest: a JSON or CSV file, a list of dicts, or (training) a folder of clips.

    JSON holds a list of objects (or `{"items": [...]}`) with keys `clip`, `prompt`, `name`, `config` for
    training and `prompt`, `name`, `motion`, `config` for generation. CSV has the same columns, `config` holding a
    JSON object. A folder of clips (video files or frame folders) takes each clip's prompt from a text file of the
    same name (`walk.mp4` -> `walk.txt`). Relative clip and motion paths resolve against the manifest's folder.
    A missing `name` is the clip's stem (training) or `NNNN-<prompt words>` (generation).

    Raises:
        ValueError: for an unreadable manifest, an item without a prompt or clip, a missing clip prompt file,
            an unsafe or duplicate name, or an unknown key.

    Example:
        >>> items = read_manifest([{"clip": "walk.mp4", "prompt": "a seagull is walking"}])
        >>> items[0].name
        'walk'
    """
    if kind not in ("train", "generate"):
        raise ValueError(f"kind={kind!r} is not supported: use 'train' or 'generate'.")
    root = Path.cwd()
    if isinstance(manifest, (str, os.PathLike)):
        path = Path(manifest)
        root = path.parent if path.is_file() else path
        rows = _rows_from_path(path, kind)
    else:
        rows = [dict(row) for row in manifest]
    allowed = {"train": {"clip", "prompt", "name", "config"}, "generate": {"prompt", "name", "motion", "config"}}[kind]
    items, seen = [], set()
    for index, row in enumerate(rows):
        unknown = sorted(set(row) - allowed)
        if unknown:
            raise ValueError(
                f"manifest item {index} has unknown key(s) {unknown}; {kind} items take {sorted(allowed)}."
            )
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"manifest item {index} has no prompt; give each item a non-empty 'prompt'.")
        config = row.get("config") or {}
        if isinstance(config, str):
            config = json.loads(config) if config.strip() else {}
        if not isinstance(config, dict):
            raise ValueError(f"manifest item {index} has config={config!r}; it must be a JSON object.")
        clip = motion = None
        if kind == "train":
            if not row.get("clip"):
                raise ValueError(f"manifest item {index} has no clip; give each training item a 'clip' path.")
            clip = str(_resolve(row["clip"], root))
            name = row.get("name") or Path(clip).stem
            MotionDistillationConfig.from_dict({**config, "prompt": prompt})  # fail now, not after hours
        else:
            motion = row.get("motion") or None
            if motion and (root / motion).exists():
                motion = str(root / motion)
            words = "-".join(re.findall(r"[a-z0-9]+", prompt.lower())[:6])
            name = row.get("name") or f"{index:04d}-{words}"
        if not _NAME.match(name) or name.startswith(PARTIAL_PREFIX):
            raise ValueError(
                f"manifest item {index} has name={name!r}; names are folder names of letters, digits, '.', '_' "
                f"and '-' that start with a letter or digit."
            )
        if name in seen:
            raise ValueError(f"manifest item {index} repeats name={name!r}; give every item its own name.")
        seen.add(name)
        items.append(ManifestItem(name=name, prompt=prompt, clip=clip, motion=motion, config=config))
    return items


def shard(items: Sequence[ManifestItem], process_index: int, num_processes: int) -> list[tuple[int, ManifestItem]]:
    """The (index, item) pairs one process works on: every `num_processes`-th item from `process_index`.

    Example:
        >>> [i for i, _ in shard([ManifestItem(str(n), "p") for n in range(5)], 1, 2)]
        [1, 3]
    """
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index={process_index} must lie in [0, num_processes={num_processes}).")
    return [(i, item) for i, item in enumerate(items) if i % num_processes == process_index]


def run_items(
    items: Sequence[ManifestItem],
    output_dir: str | os.PathLike,
    work: Callable[[ManifestItem, Path, int], dict | None],
    *,
    state=None,
) -> ManyResult:
    """Do this process's share of `items`: skip finished ones, build the rest in partial folders, publish them.

    `work(item, folder, index)` writes the item's files into `folder` (a hidden partial folder that survives a
    crash, so work can resume there) and returns facts for the `DONE` marker. The folder then gets `DONE` and is
    renamed to `output_dir/<name>`. Failures are collected, not raised, until every process is done.

    Args:
        items: the whole manifest (every process passes the same list).
        output_dir: the folder for the item folders.
        work: does one item.
        state: an `accelerate.PartialState` (one is made when None).

    Returns:
        This process's `ManyResult`.

    Raises:
        RuntimeError: after all processes are done, when any of this process's items failed.
    """
    if state is None:
        from accelerate import PartialState

        state = PartialState()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    result = ManyResult(process_index=state.process_index, num_processes=state.num_processes)
    for index, item in shard(items, state.process_index, state.num_processes):
        final = output_dir / item.name
        if (final / DONE).is_file():
            result.skipped.append(item.name)
            continue
        partial = output_dir / f"{PARTIAL_PREFIX}{item.name}"
        partial.mkdir(exist_ok=True)
        began = time.perf_counter()
        try:
            facts = work(item, partial, index) or {}
        except Exception as error:  # keep going: the other items and processes must still finish
            result.failed[item.name] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
            continue
        marker = {"name": item.name, "index": index, "process_index": state.process_index,
                  "seconds": round(time.perf_counter() - began, 3), **facts}
        atomic_write_text(partial / DONE, json.dumps(marker, indent=2))
        if final.exists():  # an unfinished folder from elsewhere: never one with DONE (skipped above)
            shutil.rmtree(final)
        os.replace(partial, final)
        result.done.append(item.name)
    state.wait_for_everyone()
    if result.failed:
        raise RuntimeError(
            f"process {state.process_index} failed on {len(result.failed)} item(s): "
            + "; ".join(f"{k}: {v}" for k, v in result.failed.items())
            + ". Rerun to retry them; finished items are skipped."
        )
    return result


def train_many(
    manifest: str | os.PathLike | Sequence[dict],
    output_dir: str | os.PathLike,
    *,
    pipeline=None,
    unet: torch.nn.Module | None = None,
    noise_scheduler=None,
    encode_prompt: Callable[[str], torch.Tensor] | None = None,
    vae: torch.nn.Module | None = None,
    config: MotionDistillationConfig | None = None,
    state=None,
    progress: bool = False,
) -> ManyResult:
    """Learn one motion per manifest item into `output_dir/<name>`, this process's share of them.

    Give either a `VMCPipeline` (clips are loaded at its keyframe size, prompts encoded by its T5, the noise prior
    inverted) or the parts `train_motion` needs: `unet`, `noise_scheduler` and `encode_prompt` (prompt -> (1, L, D)
    embeddings), plus `vae` for latent backbones. Each item's config is `config` (or the defaults) with the item's
    overrides and prompt. The adapter is removed after each item, so every motion starts from the base model.

    Args:
        manifest: see `read_manifest` (kind "train").
        output_dir: the folder of motion folders.
        pipeline: a `VMCPipeline`.
        unet: the UNet to train (without `pipeline`).
        noise_scheduler: its training noise scheduler.
        encode_prompt: prompt -> embeddings.
        vae: the VAE of a latent backbone.
        config: the shared hyperparameters.
        state: an `accelerate.PartialState`; made when None.
        progress: show training progress bars.

    Returns:
        This process's `ManyResult`.

    Example:
        >>> train_many("clips.json", "motions", pipeline=VMCPipeline.from_default())  # doctest: +SKIP
    """
    if pipeline is None and (unet is None or noise_scheduler is None or encode_prompt is None):
        raise ValueError("train_many needs a pipeline, or unet, noise_scheduler and encode_prompt together.")
    items = read_manifest(manifest, "train")
    base = (config or MotionDistillationConfig()).to_dict()

    def work(item: ManifestItem, folder: Path, index: int) -> dict:
        item_config = MotionDistillationConfig.from_dict({**base, **item.config, "prompt": item.prompt})
        if pipeline is not None:
            result = pipeline.train_motion(item.clip, item.prompt, item_config, output_dir=folder,
                                           adapter_name="default", progress=progress)
            pipeline.unload_motion("default")
        else:
            from motion_adapters.injection import unload_adapter
            from motion_adapters.training import train_motion
            from motion_adapters.video import load_video

            size = (item_config.height, item_config.width) if item_config.height and item_config.width else None
            clip = load_video(item.clip, num_frames=item_config.num_frames, size=size)
            try:
                result = train_motion(unet, clip, encode_prompt(item.prompt), noise_scheduler, item_config, vae=vae,
                                      output_dir=folder, progress=progress, training_info={"prompt": item.prompt})
            finally:
                unload_adapter(unet, "default")
        shutil.rmtree(folder / "checkpoint", ignore_errors=True)
        return {"steps": result.steps, "loss_first": result.losses[0], "loss_last": result.losses[-1]}

    return run_items(items, output_dir, work, state=state)


def generate_many(
    manifest: str | os.PathLike | Sequence[dict],
    output_dir: str | os.PathLike,
    pipeline,
    *,
    motions_dir: str | os.PathLike | None = None,
    fps: float = 8,
    state=None,
) -> ManyResult:
    """Generate one video per manifest item into `output_dir/<name>/video.mp4`, this process's share of them.

    Each item loads its motion (if any) onto `pipeline` as the only active one, generates its prompt with a
    generator seeded by the item's `seed` (default: its index) and the item's other call arguments, writes
    `video.mp4` and `item.json`, and unloads the motion again.

    Args:
        manifest: see `read_manifest` (kind "generate").
        output_dir: the folder of output folders.
        pipeline: a `VMCPipeline` (or any callable returning `.frames` with `load_motion`/`unload_motion`).
        motions_dir: where motion names of the manifest are looked up (e.g. the output of `train_many`).
        fps: frames per second of the written videos.
        state: an `accelerate.PartialState`; made when None.

    Returns:
        This process's `ManyResult`.

    Example:
        >>> generate_many("prompts.csv", "videos", pipe, motions_dir="motions")  # doctest: +SKIP
    """
    from motion_adapters.video import save_video

    items = read_manifest(manifest, "generate")

    def work(item: ManifestItem, folder: Path, index: int) -> dict:
        kwargs = dict(item.config)
        seed = int(kwargs.pop("seed", index))
        loaded = None
        if item.motion:
            location = item.motion
            if motions_dir is not None and (Path(motions_dir) / location).exists():
                location = str(Path(motions_dir) / location)
            loaded = pipeline.load_motion(location, adapter_name="generate_many")
        try:
            generator = torch.Generator(getattr(pipeline, "device", "cpu")).manual_seed(seed)
            frames = pipeline(item.prompt, generator=generator, output_type="pt", **kwargs).frames
        finally:
            if loaded is not None:
                pipeline.unload_motion(loaded)
        save_video(frames[0], folder / "video.mp4", fps=fps)
        atomic_write_text(folder / "item.json", json.dumps(
            {"prompt": item.prompt, "motion": item.motion, "seed": seed, "kwargs": kwargs}, indent=2))
        return {"seed": seed, "frames": int(frames.shape[2])}

    return run_items(items, output_dir, work, state=state)


def main(argv: Sequence[str] | None = None) -> int:
    """`train` or `generate` from a manifest; run under `accelerate launch` for one process per GPU.

    Example:
        >>> main(["train", "clips.json", "motions", "--model", "default"])  # doctest: +SKIP
        0
    """
    parser = argparse.ArgumentParser(prog="motion-adapters many", description=main.__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "generate"):
        command = sub.add_parser(name, help=f"{name} every item of a manifest")
        command.add_argument("manifest", help="a JSON or CSV manifest (or, for train, a folder of clips)")
        command.add_argument("output_dir")
        command.add_argument("--model", default="default",
                             help="'default' (the embedded shapes-world model) or a Show-1 base repo or folder")
        command.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                             help="weights dtype (default: bf16 on CUDA, else fp32)")
    sub.choices["train"].add_argument("--config", default=None, help="a MotionDistillationConfig JSON file")
    sub.choices["generate"].add_argument("--motions-dir", default=None)
    sub.choices["generate"].add_argument("--fps", type=float, default=8)
    args = parser.parse_args(argv)

    from accelerate import PartialState

    state = PartialState()
    pipeline = _load_pipeline(args.model, args.dtype, state.device)
    try:
        if args.command == "train":
            config = MotionDistillationConfig.load(args.config) if args.config else None
            result = train_many(args.manifest, args.output_dir, pipeline=pipeline, config=config, state=state,
                                progress=state.is_local_main_process)
        else:
            result = generate_many(args.manifest, args.output_dir, pipeline, motions_dir=args.motions_dir,
                                   fps=args.fps, state=state)
    except RuntimeError as error:
        print(error)
        return 1
    print(json.dumps({"process": result.process_index, "done": result.done, "skipped": result.skipped}))
    return 0


def _load_pipeline(model: str, dtype: str | None, device: torch.device):
    from motion_adapters.pipelines.vmc import VMCPipeline

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    torch_dtype = dtypes[dtype] if dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if model == "default":
        return VMCPipeline.from_default(device=device, dtype=torch_dtype)
    return VMCPipeline.from_pretrained(base=model, torch_dtype=torch_dtype).to(device)


def _rows_from_path(path: Path, kind: str) -> list[dict]:
    if path.is_dir():
        if kind != "train":
            raise ValueError(f"manifest={str(path)!r} is a folder; generation needs a JSON or CSV manifest.")
        rows = []
        for clip in sorted(path.iterdir()):
            if clip.name.startswith(".") or not (clip.is_dir() or clip.suffix.lower() in VIDEO_SUFFIXES):
                continue
            text = clip.with_suffix(".txt") if clip.is_file() else clip.parent / f"{clip.name}.txt"
            if not text.is_file():
                raise ValueError(f"clip {clip.name} has no prompt file {text.name}; write its prompt there.")
            rows.append({"clip": clip.name, "prompt": text.read_text().strip()})
        if not rows:
            raise ValueError(f"manifest folder {str(path)!r} holds no clips ({', '.join(VIDEO_SUFFIXES)} or folders).")
        return rows
    if not path.is_file():
        raise ValueError(f"manifest={str(path)!r} does not exist; pass a JSON or CSV file or a folder of clips.")
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        data = data.get("items") if isinstance(data, dict) else data
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise ValueError(f"manifest {path.name} must hold a list of objects, or {{'items': [...]}}.")
        return data
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return [{k: v for k, v in row.items() if v not in (None, "")} for row in csv.DictReader(handle)]
    raise ValueError(f"manifest={str(path)!r} is neither .json nor .csv nor a folder of clips.")


def _resolve(value: str, root: Path) -> Path:
    path = Path(value)
    return path if path.is_absolute() else root / path


if __name__ == "__main__":
    raise SystemExit(main())
