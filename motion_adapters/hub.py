"""Share motions on the Hugging Face Hub: find a motion folder locally or in the Hub cache, write its card, push it.

A motion on the Hub is a model repository holding the files of a motion folder (see `serialization`):
`motion_adapter.safetensors`, `motion_adapter_config.json`, optionally `noise_prior.safetensors`, and a
`README.md` model card. Downloads fetch only those files (never code), through `huggingface_hub`'s cache, so
`revision`, `cache_dir`, `token`, `local_files_only` and `HF_HUB_OFFLINE` behave as everywhere else on the Hub.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import httpx2
from huggingface_hub import HfApi, constants, get_cached_repo_tree, snapshot_download
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from motion_adapters.serialization import (
    CONFIG_NAME,
    NOISE_PRIOR_NAME,
    WEIGHTS_NAME,
    MotionAdapter,
    MotionFileError,
    atomic_write_text,
    load_motion_adapter,
)

logger = logging.getLogger(__name__)

README_NAME = "README.md"
MOTION_FILES = (WEIGHTS_NAME, CONFIG_NAME, NOISE_PRIOR_NAME, README_NAME)
TAGS = ("motion-adapters", "vmc", "text-to-video", "video-motion-customization")
_LOGIN = "pass token=... or run `hf auth login` (formerly `huggingface-cli login`)"


class MotionHubError(MotionFileError):
    """A motion could not be fetched from, or pushed to, the Hugging Face Hub; the message says why and what to do."""


def is_hub_id(text: str) -> bool:
    """Whether `text` has the shape of a Hub repository id, "owner/name".

    Example:
        >>> is_hub_id("someone/seagull-walk"), is_hub_id("./motions/walk"), is_hub_id("walk")
        (True, False, False)
    """
    if not isinstance(text, str) or text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)  # huggingface_hub's own rules: characters, length, no "--", "..", ".git"
    except HFValidationError:
        return False
    return True


def resolve_motion_path(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    subfolder: str | None = None,
) -> Path:
    """Return the local folder of a motion given as a folder, a file inside one, or a Hub id "owner/name".

    A local path that exists wins over a Hub id of the same spelling and is used without any network call. A
    Hub id is fetched with `huggingface_hub.snapshot_download` into the Hub cache, only the motion files and
    the model card (`MOTION_FILES`); nothing from the repository is executed. Offline, or with
    `local_files_only=True`, the cached copy is used without a network call.

    Args:
        path_or_repo_id: A motion folder, a file in one (`motion_adapter.safetensors`, ...), any other
            safetensors file (returned as is), or a Hub model repository id.
        revision: Hub branch, tag or commit (default: the repository's main branch). Hub ids only.
        cache_dir: Hub cache folder (default: `HF_HUB_CACHE`, usually `~/.cache/huggingface/hub`).
        local_files_only: Use only the cache. `None` or False: use the Hub unless `HF_HUB_OFFLINE` is set (read
            at call time, so setting it after import works too).
        token: Hub token for private or gated repositories (default: the saved login).
        subfolder: The motion's folder inside the repository or local folder, for repositories holding several.

    Returns:
        The folder holding `motion_adapter.safetensors` (a snapshot folder of the Hub cache for a Hub id).

    Raises:
        MotionFileError: for a local path that does not exist and is not a Hub id.
        MotionHubError: when the repository, revision or motion file cannot be found, is private or gated,
            or is not cached while offline or while the Hub is unreachable.
        ValueError: for a `revision` with a local path, or a `subfolder` that leaves the folder.

    Example:
        >>> resolve_motion_path("someone/seagull-walk", revision="v1.0")  # doctest: +SKIP
        PosixPath('/home/me/.cache/huggingface/hub/models--someone--seagull-walk/snapshots/3f1c.../')
    """
    text = os.fspath(path_or_repo_id)
    if subfolder is not None:
        parts = PurePosixPath(str(subfolder).replace("\\", "/")).parts
        if not parts or PurePosixPath(subfolder).is_absolute() or ".." in parts:
            raise ValueError(f"subfolder={subfolder!r} must be a relative folder inside the motion repository.")
    local = Path(text).expanduser()
    if local.exists():
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} selects a Hub revision, but {text!r} is a local path: drop revision, or "
                f"move the local {text!r} aside to load the Hub repository."
            )
        if local.is_file():
            if subfolder is not None:
                raise ValueError(f"subfolder={subfolder!r} needs a folder; {text!r} is a file.")
            return local.parent if local.name in MOTION_FILES else local
        return local / subfolder if subfolder else local
    if not is_hub_id(text):
        raise MotionFileError(
            f"no motion at {text!r}: it is not an existing path (relative to {os.getcwd()}) nor a Hub id "
            f"'owner/name'. Pass a motion folder written by save_motion_adapter / train_motion, or a Hub repo id."
        )
    offline = constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    local_files_only = bool(local_files_only) or offline
    switch = "HF_HUB_OFFLINE=1" if offline else "local_files_only=True"
    from motion_adapters import __version__  # here, not at the top: the package __init__ may import this module

    where = f"{text!r}" + (f" (revision {revision!r})" if revision else "")
    try:
        snapshot = snapshot_download(
            text,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            allow_patterns=[f"{subfolder}/{name}" if subfolder else name for name in MOTION_FILES],
            library_name="motion_adapters",
            library_version=__version__,
        )
    except GatedRepoError as err:
        raise MotionHubError(
            f"the Hub repository {text!r} is gated: accept its conditions on its page, then {_LOGIN}."
        ) from err
    except RepositoryNotFoundError as err:
        raise MotionHubError(
            f"no Hub repository {text!r} on {constants.ENDPOINT} you can read (and no local folder of that name in "
            f"{os.getcwd()}): check the id; if the repository is private, {_LOGIN}."
        ) from err
    except RevisionNotFoundError as err:
        raise MotionHubError(
            f"revision={revision!r} does not exist in the Hub repository {text!r}: pass an existing branch, tag or "
            f"commit, or revision=None for the main branch."
        ) from err
    except IncompleteSnapshotError as err:
        why = f"downloads are off ({switch})" if local_files_only else "the Hub could not be reached"
        raise MotionHubError(
            f"the cached copy of {where} in {_cache(cache_dir)} is incomplete and {why}: go online once to "
            f"complete it."
        ) from err
    except LocalEntryNotFoundError as err:
        if local_files_only or isinstance(err.__cause__, OfflineModeIsEnabled):
            raise MotionHubError(
                f"{where} is not in the local Hub cache ({_cache(cache_dir)}) and downloads are off ({switch}). "
                f"Go online ({'unset HF_HUB_OFFLINE' if offline else 'pass local_files_only=False'}), or pre-download "
                f"it where there is network with `hf download {text} --cache-dir <cache>` (or resolve_motion_path "
                f"online) and bring the cache folder along."
            ) from err
        raise MotionHubError(
            f"could not reach the Hub at {constants.ENDPOINT} ({err.__cause__ or err}) and the local cache "
            f"({_cache(cache_dir)}) has no copy of {where}: check the network (or HF_ENDPOINT), or pre-download it."
        ) from err
    except HfHubHTTPError as err:
        raise MotionHubError(f"the Hub refused to serve {where}: {_short(err)}") from err
    except (httpx2.TransportError, OSError) as err:
        raise MotionHubError(
            f"could not reach the Hub at {constants.ENDPOINT} for {where} ({err}): check the network, proxy or "
            f"HF_ENDPOINT."
        ) from err
    folder = Path(snapshot) / subfolder if subfolder else Path(snapshot)
    if not (folder / WEIGHTS_NAME).is_file():
        raise _not_a_motion(where, subfolder, _repo_files(text, Path(snapshot), cache_dir))
    return folder


def _not_a_motion(where: str, subfolder: str | None, held: list[str] | None) -> MotionHubError:
    inside = f" in subfolder {subfolder!r}" if subfolder else ""
    if held is None:
        listing = "its file list is unknown"
    else:
        listing = f"it holds {', '.join(held)}" if held else "it holds no files"
    nested = sorted(str(PurePosixPath(p).parent) for p in held or [] if PurePosixPath(p).name == WEIGHTS_NAME)
    hint = f" Motions lie in subfolder(s) {', '.join(map(repr, nested))}: pass subfolder=." if nested else ""
    return MotionHubError(
        f"the Hub repository {where} holds no {WEIGHTS_NAME}{inside}, so it is not a motion adapter; {listing}.{hint}"
    )


def _cache(cache_dir: str | os.PathLike | None) -> str:
    return str(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)


def _short(err: HfHubHTTPError) -> str:
    status = getattr(err.response, "status_code", None)
    server = getattr(err, "server_message", None) or str(err).splitlines()[0]
    return f"HTTP {status}: {server}" if status else server


def _repo_files(repo_id: str, snapshot: Path, cache_dir: str | os.PathLike | None) -> list[str] | None:
    """The repository's file list from the tree cache of this snapshot, else the files of the cached copy."""
    try:
        return sorted(f.path for f in get_cached_repo_tree(repo_id, revision=snapshot.name, cache_dir=cache_dir))
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        pass
    if snapshot.is_dir():
        return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    return None


def make_model_card(motion: MotionAdapter, repo_id: str | None = None) -> str:
    """Write a Hub model card (README.md) for a motion from the facts it records, and nothing else.

    The YAML front matter tags it for the Hub (`library_name: motion_adapters`, the `TAGS`, `pipeline_tag:
    text-to-video`, and `base_model` when the run recorded a Hub id as `training["base_model"]`). The body says
    what the motion is (training prompt), what was adapted (backbone, mode, target, modules, parameters, rank),
    the training run (frames, size, steps, loss first -> last, the distillation config) and how to load it.
    A section whose facts were not recorded is left out.

    Args:
        motion: The motion, e.g. from `load_motion_adapter`.
        repo_id: The Hub id the card is for; used in the title and the load snippets (default: the folder).

    Returns:
        The README.md text.

    Example:
        >>> card = make_model_card(load_motion_adapter("motions/seagull-walk"), "me/seagull-walk")  # doctest: +SKIP
    """
    info, training, config = motion.info, dict(motion.training or {}), dict(motion.distillation or {})
    target = repo_id or (str(motion.path) if motion.path is not None else "path/to/motion")
    title = repo_id or (motion.path.name if motion.path is not None else info.adapter_name)
    base_model = training.get("base_model")
    front = ["---", "library_name: motion_adapters", "tags:", *(f"- {tag}" for tag in TAGS)]
    if isinstance(base_model, str) and is_hub_id(base_model):
        front.append(f"base_model: {base_model}")
    front += ["pipeline_tag: text-to-video", "---", ""]
    out = [*front, f"# {title}", ""]
    out += [
        "A motion adapter for the `motion_adapters` library: the motion of one video distilled (VMC, Video Motion "
        "Customization) into the temporal attention of a text-to-video UNet, so new prompts can move the same way.",
        "",
    ]
    prompt = training.get("prompt") or config.get("prompt")
    clip = training.get("clip")
    if prompt or clip:
        out += ["## The motion", ""]
        if prompt:
            out.append(f"Training prompt: {json.dumps(prompt, ensure_ascii=False)}.")
        if clip:
            out.append(f"Training clip: `{Path(str(clip)).name}`.")
        out.append("")

    rows = [("Backbone", f"`{info.backbone}`")]
    if base_model:
        rows.append(("Base model", f"`{base_model}`"))
    mode = {"full": "full (the matched weights themselves)", "lora": "LoRA"}.get(info.mode, info.mode)
    targets = [info.target] if isinstance(info.target, str) else list(info.target)
    rows += [("Mode", mode), ("Target", ", ".join(f"`{t}`" for t in targets))]
    rows += [("Adapted modules", str(len(info.module_names))), ("Parameters", f"{info.num_parameters:,}")]
    if info.r is not None:
        alpha = f" (lora_alpha {info.lora_alpha:g})" if info.lora_alpha is not None else ""
        rows.append(("Rank", f"{info.r}{alpha}"))
    compression = training.get("compression")
    if isinstance(compression, dict) and "relative_error" in compression:
        rows.append(("Compressed", f"from a full adapter by SVD, relative error {compression['relative_error']:.3g}"))
    out += ["## What was adapted", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]

    run = _training_facts(training, config)
    if run or config:
        out += ["## Training", ""] + [f"- {fact}" for fact in run] + ([""] if run else [])
        if config:
            out += ["Distillation config:", "", "```json", json.dumps(config, indent=2, sort_keys=True), "```", ""]

    files = [f"- `{WEIGHTS_NAME}`: the adapter weights (safetensors; loading runs no code).", f"- `{CONFIG_NAME}`: "
             "the same description as JSON."]
    if motion.noise_prior is not None:
        files.append(f"- `{NOISE_PRIOR_NAME}`: the DDIM-inverted noise of the training clip.")
    out += ["## Files", "", *files, ""]

    out += [
        "## Use it",
        "",
        "```python",
        "from motion_adapters import VMCPipeline",
        "",
        f"pipe = VMCPipeline.from_pretrained({json.dumps(base_model) if base_model else ''})",
        f"pipe.load_motion({json.dumps(target)})",
        'video = pipe("a dog is walking").frames[0]',
        "```",
        "",
        "or from the command line:",
        "",
        "```bash",
        f'motion-adapters generate --motion {shlex.quote(target)} --prompt "a dog is walking"',
        "```",
        "",
    ]
    return "\n".join(out)


def _training_facts(training: dict[str, Any], config: dict[str, Any]) -> list[str]:
    facts = []
    frames = training.get("num_frames", config.get("num_frames"))
    if frames is not None:
        facts.append(f"Frames: {frames}")
    height, width = training.get("height", config.get("height")), training.get("width", config.get("width"))
    if height is not None and width is not None:
        facts.append(f"Frame size: {height} x {width} (height x width)")
    if training.get("steps") is not None:
        facts.append(f"Steps: {training['steps']}")
    losses = training.get("losses") or []
    first = training.get("loss_first", losses[0] if losses else None)
    last = training.get("loss_last", losses[-1] if losses else None)
    if first is not None and last is not None:
        name = config.get("loss")
        name = f"{name} ({config['cos_variant']})" if name == "cos" and config.get("cos_variant") else name
        facts.append(f"Loss{f' {name}' if name else ''}: {_num(first)} -> {_num(last)} (first -> last step)")
    if training.get("seconds") is not None:
        device = f" on {training['device']}" if training.get("device") else ""
        facts.append(f"Time: {float(training['seconds']):.0f} s{device}")
    return facts


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def push_motion_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> str:
    """Upload a motion folder to a Hub model repository, creating the repository when needed.

    The folder is loaded first (`load_motion_adapter`): one that does not load is not pushed. When it has no
    README.md, one is written into it from `make_model_card`. Only the motion files and README.md are uploaded
    (`MOTION_FILES`), in one commit.

    Args:
        folder: A motion folder written by `save_motion_adapter` / `train_motion`.
        repo_id: The Hub model repository, "owner/name"; created if missing.
        token: A Hub token with write access (default: the saved login).
        private: Create the repository private; `None` uses the account's default. Ignored if it exists.
        commit_message: The commit title (default: "Upload motion adapter <adapter_name>").
        revision: The branch to commit to (default: main); it must exist.
        create_pr: Open a pull request with the commit instead of committing to the branch.

    Returns:
        The URL of the commit.

    Raises:
        MotionFileError: when the folder is not a loadable motion folder.
        MotionHubError: when the Hub refuses the push (no or a read-only token, missing branch, network).
        ValueError: for a `repo_id` that is not "owner/name".

    Example:
        >>> push_motion_to_hub("motions/seagull-walk", "me/seagull-walk", private=True)  # doctest: +SKIP
        'https://huggingface.co/me/seagull-walk/commit/5a1b...'
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MotionFileError(
            f"folder={str(folder)!r} is not a folder: pass the motion folder written by save_motion_adapter."
        )
    if not isinstance(repo_id, str) or not is_hub_id(repo_id):
        raise ValueError(f"repo_id={repo_id!r} is not a Hub id 'owner/name': pass e.g. 'your-name/seagull-walk'.")
    if create_pr and revision is not None:
        raise ValueError(
            f"create_pr=True opens a pull request against the main branch, so revision={revision!r} cannot be used "
            f"with it: drop revision, or push to the branch with create_pr=False."
        )
    motion = load_motion_adapter(folder)
    if not (folder / README_NAME).is_file():
        atomic_write_text(folder / README_NAME, make_model_card(motion, repo_id))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            allow_patterns=list(MOTION_FILES),
            commit_message=commit_message or f"Upload motion adapter {motion.info.adapter_name}",
            revision=revision,
            create_pr=create_pr,
        )
    except RevisionNotFoundError as err:
        raise MotionHubError(
            f"revision={revision!r} is not a branch of {repo_id!r}: create it first "
            f"(HfApi().create_branch({repo_id!r}, branch={revision!r})) or pass revision=None for main."
        ) from err
    except RepositoryNotFoundError as err:
        raise MotionHubError(
            f"cannot write to the Hub repository {repo_id!r}: the token cannot see it; {_LOGIN} with a write token."
        ) from err
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status == 401:
            fix = f"the Hub did not accept the credentials; {_LOGIN} with a write token"
        elif status == 403:
            fix = "the token has no write permission there: use a write token (or a fine-grained one that can write"
            fix += " to that namespace)"
        else:
            fix = _short(err)
        raise MotionHubError(f"could not push {folder} to the Hub repository {repo_id!r}: {fix}.") from err
    except ValueError as err:
        if README_NAME not in str(err):
            raise
        raise MotionHubError(
            f"the Hub rejected the metadata of {folder / README_NAME} for {repo_id!r}: {err}\nFix its YAML front "
            f"matter, or delete the file to push a generated model card."
        ) from err
    except OfflineModeIsEnabled as err:
        raise MotionHubError(f"cannot push to {repo_id!r} in offline mode: unset HF_HUB_OFFLINE.") from err
    except (httpx2.TransportError, OSError) as err:
        raise MotionHubError(
            f"could not reach the Hub at {api.endpoint} to push {repo_id!r} ({err}): check the network or HF_ENDPOINT."
        ) from err
    if getattr(commit, "pr_url", None):
        logger.info("opened pull request %s", commit.pr_url)
    return commit.commit_url
