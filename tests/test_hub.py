"""Hub tests: all offline. A fake Hub HTTP server on 127.0.0.1 stands in for huggingface.co."""

import base64
import hashlib
import json
import os
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
import yaml
from huggingface_hub import constants
from huggingface_hub.utils import _detect_agent

from motion_adapters import hub
from motion_adapters.hub import (
    MOTION_FILES,
    MotionHubError,
    is_hub_id,
    make_model_card,
    push_motion_to_hub,
    resolve_motion_path,
)
from motion_adapters.injection import AdapterInfo
from motion_adapters.serialization import (
    CONFIG_NAME,
    NOISE_PRIOR_NAME,
    WEIGHTS_NAME,
    MotionAdapter,
    MotionFileError,
    load_motion_adapter,
    save_motion_adapter,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
DISTILLATION = {"prompt": "a seagull is walking", "loss": "cos", "cos_variant": "official", "max_train_steps": 3,
                "learning_rate": 1e-4, "num_frames": 8, "height": 40, "width": 64}
TRAINING = {"prompt": "a seagull is walking", "base_model": "showlab/show-1-base", "num_frames": 8, "height": 40,
            "width": 64, "loss_first": 0.9, "loss_last": 0.1, "steps": 3, "seconds": 12.4, "device": "cpu",
            "clip": "/home/someone/clips/seagull.mp4"}


def _motion(**overrides):
    fields = {
        "tensors": {"a.to_q.weight": torch.randn(4, 4)},
        "info": AdapterInfo("default", "full", "temporal_attn.to_[qkv]", "UNet3DConditionModel", ["a.to_q"], 16),
        "distillation": dict(DISTILLATION),
        "training": dict(TRAINING),
        "noise_prior": torch.randn(1, 4, 2, 5, 8),
    }
    fields.update(overrides)
    return MotionAdapter(**fields)


@pytest.fixture
def motion_dir(tmp_path):
    return save_motion_adapter(_motion(), tmp_path / "seagull-walk")


def _closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _point_hub_at(monkeypatch, endpoint):
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)


@pytest.fixture(autouse=True)
def _no_real_hub(tmp_path, monkeypatch):
    """Every test: the Hub endpoint is a closed loopback port, the cache and token live in tmp, offline is off."""
    _point_hub_at(monkeypatch, f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)  # no registry fetch
    monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "xet"))  # hf_xet's logs, read when its session starts
    monkeypatch.setenv("HF_XET_TELEMETRY_ENABLED", "false")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def _populate_cache(cache_dir, repo_id, source_folder, files=None, commit=COMMIT):
    """The huggingface_hub cache layout: blobs/<hash>, snapshots/<commit>/<file> -> ../../blobs/<hash>, refs/main."""
    storage = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir()
    for name in files or [n for n in MOTION_FILES if (Path(source_folder) / n).is_file()]:
        data = (Path(source_folder) / name).read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    return snapshot


def _git_blob_id(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Just enough of the Hub's HTTP API for create_repo, upload_folder (regular files) and snapshot_download."""

    def __init__(self):
        self.repos = {}  # repo_id -> {"sha": commit, "files": {path: bytes}}
        self.gated, self.read_only = set(), set()
        self.requests, self.creates, self.commits, self.validated, self.yaml_errors = [], [], [], [], []
        self.pull_requests = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def add_repo(self, repo_id, files):
        self.repos[repo_id] = {"sha": hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest(), "files": files}

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def _handler(hub):  # noqa: N805  (the handler class closes over the fake hub)
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path = urlsplit(self.path).path
                hub.requests.append(("POST", path))
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    hub.creates.append(payload)
                    repo_id = f"{payload['organization']}/{payload['name']}"
                    if repo_id in hub.repos:
                        return self._send(409, {"error": "You already created this model repo",
                                                "url": f"{hub.endpoint}/{repo_id}"})
                    hub.repos[repo_id] = {"sha": "0" * 40, "files": {}}
                    return self._send(200, {"url": f"{hub.endpoint}/{repo_id}"})
                if path == "/api/validate-yaml":
                    hub.validated.append(json.loads(body)["content"])
                    if hub.yaml_errors:
                        return self._send(400, {"errors": [{"message": m} for m in hub.yaml_errors]})
                    return self._send(200, {"errors": [], "warnings": []})
                repo_id, rest = self._repo(path)
                if repo_id is None:
                    return
                if repo_id in hub.read_only:
                    return self._send(403, {"error": "You don't have the rights to create a commit"})
                if rest[0] == "discussions":  # create_pull_request
                    hub.pull_requests.append(json.loads(body))
                    return self._send(200, {"num": len(hub.pull_requests)})
                if rest[0] in ("preupload", "commit") and not unquote(rest[1]).startswith(("main", "refs/pr/")):
                    return self._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
                if rest[0] == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
                    ]})
                if rest[0] == "commit":
                    lines = [json.loads(line) for line in body.decode().splitlines() if line]
                    files = {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines[1:]}
                    repo = hub.repos[repo_id]
                    repo["files"].update(files)
                    repo["sha"] = hashlib.sha1(body).hexdigest()
                    create_pr = "create_pr=1" in urlsplit(self.path).query
                    hub.commits.append({"repo_id": repo_id, "revision": unquote(rest[1]), "header": lines[0]["value"],
                                        "create_pr": create_pr, "files": files})
                    return self._send(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{repo['sha']}",
                                            "commitOid": repo["sha"], "pullRequestUrl": f"{hub.endpoint}/{repo_id}/"
                                            f"discussions/{len(hub.pull_requests) + 1}" if create_pr else None})
                self._send(404, {"error": "unknown route"})

            def _serve(self, head):
                path = urlsplit(self.path).path
                hub.requests.append(("HEAD" if head else "GET", path))
                if path.startswith("/api/models/"):
                    repo_id, rest = self._repo(path)
                    if repo_id is None:
                        return
                    repo = hub.repos[repo_id]
                    if rest[0] == "revision" and unquote(rest[1]) not in ("main", repo["sha"]):
                        return self._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
                    if rest[0] == "revision":
                        return self._send(200, {"id": repo_id, "sha": repo["sha"], "siblings": []})
                    if rest[0] == "discussions":  # get_discussion_details of a pull request just opened
                        num = int(rest[1])
                        return self._send(200, {
                            "num": num, "title": hub.pull_requests[num - 1]["title"], "author": {"name": "me"},
                            "createdAt": "2026-01-01T00:00:00.000Z", "status": "draft", "isPullRequest": True,
                            "repo": {"name": repo_id, "type": "model"}, "events": [], "filesWithConflicts": [],
                            "changes": {"base": "refs/heads/main"},
                        })
                    if rest[0] == "tree":
                        return self._send(200, [{"type": "file", "path": p, "size": len(d), "oid": _git_blob_id(d)}
                                                for p, d in sorted(repo["files"].items())])
                elif "/resolve/" in path:
                    repo_id, _, tail = path.lstrip("/").partition("/resolve/")
                    filename = unquote(tail.split("/", 1)[1])
                    data = hub.repos[repo_id]["files"][filename]
                    self.send_response(200)
                    self.send_header("X-Repo-Commit", hub.repos[repo_id]["sha"])
                    self.send_header("ETag", f'"{_git_blob_id(data)}"')
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if not head:
                        self.wfile.write(data)
                    return
                self._send(404, {"error": "unknown route"})

            def _repo(self, path):
                parts = path.split("/")  # "", "api", "models", owner, name, route, ...
                repo_id = f"{parts[3]}/{parts[4]}"
                if repo_id in hub.gated:
                    self._send(403, {"error": "gated"}, {"X-Error-Code": "GatedRepo"})
                    return None, None
                if repo_id not in hub.repos:
                    self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    return None, None
                return repo_id, parts[5:] + [""]

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


@pytest.fixture
def fake_hub(monkeypatch):
    server = FakeHub()
    _point_hub_at(monkeypatch, server.endpoint)
    yield server
    server.stop()


# -- resolve_motion_path: local ------------------------------------------------------------------------------------


def test_resolve_returns_a_local_folder_and_the_folder_of_a_file_inside_it_without_the_hub(motion_dir, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was called for a local path")

    monkeypatch.setattr(hub, "snapshot_download", no_hub)
    assert resolve_motion_path(motion_dir) == motion_dir
    assert resolve_motion_path(str(motion_dir)) == motion_dir
    assert resolve_motion_path(motion_dir / WEIGHTS_NAME) == motion_dir
    assert resolve_motion_path(motion_dir / CONFIG_NAME) == motion_dir
    renamed = motion_dir.parent / "walk.safetensors"
    shutil.copy(motion_dir / WEIGHTS_NAME, renamed)
    assert resolve_motion_path(renamed) == renamed  # a standalone file stays the file load_motion_adapter reads


def test_resolve_a_local_path_that_shadows_a_hub_id_wins(tmp_path, motion_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(motion_dir, tmp_path / "owner" / "walk")
    monkeypatch.setattr(hub, "snapshot_download", lambda *a, **k: pytest.fail("the Hub was called"))
    assert resolve_motion_path("owner/walk") == Path("owner/walk")
    with pytest.raises(ValueError, match=r"revision='v1' selects a Hub revision, but 'owner/walk' is a local path"):
        resolve_motion_path("owner/walk", revision="v1")


@pytest.mark.parametrize("missing", ["./motions/nope", "/definitely/not/here", "a/b/c", "nope", "owner/../x"])
def test_resolve_a_missing_path_that_is_no_hub_id_names_it(missing):
    with pytest.raises(MotionFileError, match=rf"no motion at {missing!r}: it is not an existing path .* Hub id"):
        resolve_motion_path(missing)


@pytest.mark.parametrize("subfolder", ["../up", "/abs", ""])
def test_resolve_rejects_a_subfolder_that_leaves_the_folder(motion_dir, subfolder):
    with pytest.raises(ValueError, match=rf"subfolder={subfolder!r} must be a relative folder"):
        resolve_motion_path(motion_dir, subfolder=subfolder)


def test_is_hub_id():
    assert is_hub_id("someone/seagull-walk") and is_hub_id("Org_1/name.v2")
    for text in ("walk", "a/b/c", "./a/b", "/a/b", "a--b/c", "a/b..c", "a/b.git", "~/motions", "owner-/x", "o/x.",
                 "o/" + "x" * 100, "o/bad name"):
        assert not is_hub_id(text), text


# -- resolve_motion_path: the Hub cache, offline ---------------------------------------------------------------------


def test_resolve_reads_a_prepopulated_cache_with_local_files_only(tmp_path, motion_dir, fake_hub):
    cache = tmp_path / "cache"
    snapshot = _populate_cache(cache, "owner/seagull-walk", motion_dir)
    folder = resolve_motion_path("owner/seagull-walk", cache_dir=cache, local_files_only=True)
    assert folder == snapshot
    loaded, original = load_motion_adapter(folder), load_motion_adapter(motion_dir)
    torch.testing.assert_close(loaded.tensors, original.tensors)
    torch.testing.assert_close(loaded.noise_prior, original.noise_prior)
    assert loaded.training == TRAINING
    assert fake_hub.requests == []
    # a pinned commit resolves from the cache as well
    pinned = resolve_motion_path("owner/seagull-walk", cache_dir=cache, revision=COMMIT, local_files_only=True)
    assert pinned == snapshot


@pytest.mark.parametrize("switch", ["environment", "huggingface_hub.constants"])
def test_resolve_reads_the_cache_when_hf_hub_offline_is_set(tmp_path, motion_dir, fake_hub, monkeypatch, switch):
    if switch == "environment":  # set after import: huggingface_hub's constant does not see it, resolve does
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "cache"
    snapshot = _populate_cache(cache, "owner/seagull-walk", motion_dir)
    assert resolve_motion_path("owner/seagull-walk", cache_dir=cache) == snapshot
    torch.testing.assert_close(load_motion_adapter(snapshot).tensors, load_motion_adapter(motion_dir).tensors)
    assert fake_hub.requests == []


@pytest.mark.parametrize("how", ["env", "local_files_only", "constant_with_local_files_only_false"])
def test_resolve_offline_without_a_cached_copy_says_how_to_get_one(tmp_path, fake_hub, monkeypatch, how):
    kwargs = {"cache_dir": tmp_path / "empty-cache"}
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif how == "local_files_only":
        kwargs["local_files_only"] = True
    else:  # huggingface_hub itself refuses the network
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        kwargs["local_files_only"] = False
    switch, fix = ("local_files_only=True", "pass local_files_only=False") if how == "local_files_only" else (
        "HF_HUB_OFFLINE=1", "unset HF_HUB_OFFLINE")
    with pytest.raises(MotionHubError, match=rf"'owner/walk' is not in the local Hub cache .*empty-cache.* downloads "
                                             rf"are off \({switch}\)\. Go online \({fix}\), or pre-download it "
                                             rf"where there is network with `hf download owner/walk"):
        resolve_motion_path("owner/walk", **kwargs)
    assert fake_hub.requests == []


def test_resolve_unreachable_hub_uses_the_cache_and_says_so_without_one(tmp_path, motion_dir):
    cache = tmp_path / "cache"
    snapshot = _populate_cache(cache, "owner/seagull-walk", motion_dir)
    assert resolve_motion_path("owner/seagull-walk", cache_dir=cache) == snapshot  # the endpoint is a closed port
    with pytest.raises(MotionHubError, match=r"could not reach the Hub at http://127\.0\.0\.1:\d+ .* and the local "
                                             r"cache .* has no copy of 'owner/other'"):
        resolve_motion_path("owner/other", cache_dir=cache)


# -- resolve_motion_path: Hub errors (fake Hub) ---------------------------------------------------------------------


def test_resolve_unknown_repo_says_it_was_not_found(tmp_path, fake_hub):
    with pytest.raises(MotionHubError, match=r"no Hub repository 'owner/missing' on http://127.0.0.1:\d+ you can "
                                             r"read .* if the repository is private, pass token=\.\.\. or run "
                                             r"`hf auth login`"):
        resolve_motion_path("owner/missing", cache_dir=tmp_path / "cache")
    assert ("GET", "/api/models/owner/missing/revision/main") in fake_hub.requests


def test_resolve_gated_repo_asks_for_access_and_a_token(tmp_path, fake_hub):
    fake_hub.gated.add("owner/gated")
    with pytest.raises(MotionHubError, match=r"'owner/gated' is gated: accept its conditions .* token="):
        resolve_motion_path("owner/gated", cache_dir=tmp_path / "cache")


def test_resolve_unknown_revision_names_it(tmp_path, fake_hub):
    fake_hub.add_repo("owner/walk", {WEIGHTS_NAME: b"x"})
    with pytest.raises(MotionHubError, match=r"revision='v9' does not exist in the Hub repository 'owner/walk'"):
        resolve_motion_path("owner/walk", revision="v9", cache_dir=tmp_path / "cache")


def test_resolve_repo_without_a_motion_lists_what_it_holds(tmp_path, fake_hub):
    fake_hub.add_repo("owner/a-lora", {"config.json": b"{}", "pytorch_lora_weights.safetensors": b"x"})
    with pytest.raises(MotionHubError, match=r"'owner/a-lora' holds no motion_adapter.safetensors, so it is not a "
                                             r"motion adapter; it holds config.json, pytorch_lora_weights"):
        resolve_motion_path("owner/a-lora", cache_dir=tmp_path / "cache")


def test_resolve_repo_with_motions_in_subfolders_points_at_subfolder(tmp_path, motion_dir, fake_hub):
    files = {f"walk/{n}": (motion_dir / n).read_bytes() for n in (WEIGHTS_NAME, CONFIG_NAME)}
    fake_hub.add_repo("owner/motions", {**files, "README.md": b"# motions"})
    with pytest.raises(MotionHubError, match=r"Motions lie in subfolder\(s\) 'walk': pass subfolder="):
        resolve_motion_path("owner/motions", cache_dir=tmp_path / "cache")
    folder = resolve_motion_path("owner/motions", cache_dir=tmp_path / "cache", subfolder="walk")
    torch.testing.assert_close(load_motion_adapter(folder).tensors, load_motion_adapter(motion_dir).tensors)


# -- push_motion_to_hub (fake Hub) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("xet", [True, False], ids=["hf_xet pipeline", "create_commit"])
def test_push_uploads_exactly_the_motion_files_and_a_card_then_downloads_them(
    tmp_path, motion_dir, fake_hub, monkeypatch, xet
):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)  # the two upload paths of huggingface_hub
    (motion_dir / "notes.txt").write_text("not for the Hub")
    (motion_dir / "checkpoints").mkdir()
    (motion_dir / "checkpoints" / "step_2.safetensors").write_bytes(b"not for the Hub")
    url = push_motion_to_hub(motion_dir, "owner/seagull-walk", token="hf_fake", private=True,
                             commit_message="Add the seagull walk")

    assert fake_hub.creates == [{"name": "seagull-walk", "organization": "owner", "visibility": "private"}]
    (commit,) = fake_hub.commits
    assert url == f"{fake_hub.endpoint}/owner/seagull-walk/commit/{fake_hub.repos['owner/seagull-walk']['sha']}"
    assert commit["header"]["summary"] == "Add the seagull walk"
    assert commit["revision"] == "main"
    assert set(commit["files"]) == {WEIGHTS_NAME, CONFIG_NAME, NOISE_PRIOR_NAME, "README.md"}
    for name, data in commit["files"].items():
        assert data == (motion_dir / name).read_bytes(), name
    assert "pipe.load_motion(\"owner/seagull-walk\")" in (motion_dir / "README.md").read_text()
    assert set(fake_hub.validated) == {(motion_dir / "README.md").read_text()}  # the Hub checked the card

    cache = tmp_path / "download-cache"
    folder = resolve_motion_path("owner/seagull-walk", cache_dir=cache)
    assert folder.parents[1] == cache / "models--owner--seagull-walk"
    assert sorted(p.name for p in folder.iterdir()) == sorted(commit["files"])
    torch.testing.assert_close(load_motion_adapter(folder).tensors, load_motion_adapter(motion_dir).tensors)
    fake_hub.requests.clear()
    assert resolve_motion_path("owner/seagull-walk", cache_dir=cache, local_files_only=True) == folder
    assert fake_hub.requests == []


def test_resolve_an_incomplete_cached_copy_offline_says_so(tmp_path, motion_dir, fake_hub):
    fake_hub.add_repo("owner/walk", {n: (motion_dir / n).read_bytes() for n in (WEIGHTS_NAME, CONFIG_NAME)})
    folder = resolve_motion_path("owner/walk", cache_dir=tmp_path / "cache")  # also caches the repo's file list
    (folder / CONFIG_NAME).unlink()
    with pytest.raises(MotionHubError, match=r"the cached copy of 'owner/walk' in .*cache is incomplete and downloads "
                                             r"are off \(local_files_only=True\): go online once"):
        resolve_motion_path("owner/walk", cache_dir=tmp_path / "cache", local_files_only=True)


def test_push_keeps_an_existing_readme_and_reuses_an_existing_repo(motion_dir, fake_hub):
    (motion_dir / "README.md").write_text("# my own card\n")
    fake_hub.add_repo("owner/seagull-walk", {})
    push_motion_to_hub(motion_dir, "owner/seagull-walk", token="hf_fake")
    (commit,) = fake_hub.commits
    assert commit["files"]["README.md"] == b"# my own card\n"
    assert commit["header"]["summary"] == "Upload motion adapter default"


def test_push_with_card_metadata_the_hub_rejects_names_the_file(motion_dir, fake_hub):
    fake_hub.yaml_errors = ["\"license\" must be one of [apache-2.0, mit, ...]"]
    (motion_dir / "README.md").write_text("---\nlicense: my-own\n---\n# card\n")
    with pytest.raises(MotionHubError, match=r"(?s)the Hub rejected the metadata of .*README.md for 'owner/w'.*"
                                             r"license.*Fix its YAML front matter, or delete the file"):
        push_motion_to_hub(motion_dir, "owner/w", token="hf_fake")
    assert fake_hub.commits == []


@pytest.mark.parametrize("xet", [True, False], ids=["hf_xet pipeline", "create_commit"])
def test_push_with_create_pr_commits_to_a_pull_request(motion_dir, fake_hub, monkeypatch, xet):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    fake_hub.add_repo("owner/walk", {})
    url = push_motion_to_hub(motion_dir, "owner/walk", token="hf_fake", create_pr=True)
    (commit,) = fake_hub.commits
    assert url == f"{fake_hub.endpoint}/owner/walk/commit/{fake_hub.repos['owner/walk']['sha']}"
    if xet:  # the pipeline opens the pull request first, then commits to its ref
        assert fake_hub.pull_requests[0]["pullRequest"] is True and commit["revision"] == "refs/pr/1"
    else:
        assert commit["create_pr"] and commit["revision"] == "main"
    assert set(commit["files"]) == {WEIGHTS_NAME, CONFIG_NAME, NOISE_PRIOR_NAME, "README.md"}


def test_push_to_a_missing_branch_says_to_create_it(motion_dir, fake_hub):
    with pytest.raises(MotionHubError, match=r"revision='dev' is not a branch of 'owner/walk': create it first "
                                             r"\(HfApi\(\).create_branch\('owner/walk', branch='dev'\)\)"):
        push_motion_to_hub(motion_dir, "owner/walk", token="hf_fake", revision="dev")
    assert fake_hub.commits == []


def test_push_rejects_create_pr_with_a_revision(motion_dir):
    with pytest.raises(ValueError, match=r"create_pr=True opens a pull request against the main branch, so "
                                         r"revision='dev' cannot be used with it"):
        push_motion_to_hub(motion_dir, "owner/w", create_pr=True, revision="dev")


def test_push_refuses_a_folder_that_does_not_load(tmp_path, fake_hub):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / WEIGHTS_NAME).write_bytes(b"not safetensors")
    with pytest.raises(MotionFileError, match="is not a readable safetensors file"):
        push_motion_to_hub(broken, "owner/broken", token="hf_fake")
    with pytest.raises(MotionFileError, match=r"folder='.*missing' is not a folder"):
        push_motion_to_hub(tmp_path / "missing", "owner/broken", token="hf_fake")
    assert fake_hub.requests == [] and not (broken / "README.md").exists()


@pytest.mark.parametrize("repo_id", ["seagull-walk", "a/b/c", "owner/bad name"])
def test_push_rejects_a_repo_id_that_is_not_owner_name(motion_dir, repo_id):
    with pytest.raises(ValueError, match=rf"repo_id={repo_id!r} is not a Hub id 'owner/name'"):
        push_motion_to_hub(motion_dir, repo_id)


def test_push_without_write_permission_names_the_repo_and_asks_for_a_write_token(motion_dir, fake_hub):
    fake_hub.add_repo("someone-else/walk", {})
    fake_hub.read_only.add("someone-else/walk")
    with pytest.raises(MotionHubError, match=r"could not push .* to the Hub repository 'someone-else/walk': the token "
                                             r"has no write permission there: use a write token"):
        push_motion_to_hub(motion_dir, "someone-else/walk", token="hf_read_only")


def test_push_to_an_unreachable_hub_says_so(motion_dir):
    with pytest.raises(MotionHubError, match=r"could not reach the Hub at http://127\.0\.0\.1:\d+ to push 'owner/w'"):
        push_motion_to_hub(motion_dir, "owner/w", token="hf_fake")


# -- make_model_card ------------------------------------------------------------------------------------------------


def _front_matter(card):
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_states_the_recorded_facts_and_how_to_load(motion_dir):
    card = make_model_card(load_motion_adapter(motion_dir), "owner/seagull-walk")
    assert _front_matter(card) == {
        "library_name": "motion_adapters",
        "tags": ["motion-adapters", "vmc", "text-to-video", "video-motion-customization"],
        "base_model": "showlab/show-1-base",
        "pipeline_tag": "text-to-video",
    }
    for fact in ['Training prompt: "a seagull is walking"', "Training clip: `seagull.mp4`",
                 "| Backbone | `UNet3DConditionModel` |", "| Base model | `showlab/show-1-base` |",
                 "| Mode | full (the matched weights themselves) |", "| Target | `temporal_attn.to_[qkv]` |",
                 "| Adapted modules | 1 |", "| Parameters | 16 |", "- Frames: 8", "- Frame size: 40 x 64",
                 "- Steps: 3", "- Loss cos (official): 0.9 -> 0.1", "- Time: 12 s on cpu", '"learning_rate": 0.0001',
                 NOISE_PRIOR_NAME, "from motion_adapters import VMCPipeline",
                 'pipe = VMCPipeline.from_pretrained("showlab/show-1-base")', 'pipe.load_motion("owner/seagull-walk")',
                 'pipe("a dog is walking"', 'motion-adapters generate --motion owner/seagull-walk --prompt']:
        assert fact in card, fact
    assert "/home/someone" not in card
    assert "Rank" not in card  # a full adapter has no rank
    assert json.loads(card.split("```json\n")[1].split("```")[0]) == DISTILLATION


def test_model_card_omits_what_was_not_recorded(tmp_path):
    info = AdapterInfo("default", "lora", ["a.to_q"], "UNetMotionModel", ["a.to_q"], 64, r=4, lora_alpha=8.0)
    training = {"base_model": "/local/checkpoints/base"}
    motion = _motion(info=info, distillation=None, training=training, noise_prior=None)
    motion.tensors = {"a.to_q.lora_A.weight": torch.randn(4, 8), "a.to_q.lora_B.weight": torch.randn(8, 4)}
    card = make_model_card(load_motion_adapter(save_motion_adapter(motion, tmp_path / "m")))
    assert "base_model" not in _front_matter(card)  # a local path is no Hub id
    assert "| Base model | `/local/checkpoints/base` |" in card and "| Rank | 4 (lora_alpha 8) |" in card
    for absent in ("## The motion", "## Training", "Training prompt", "Loss", "Steps", "```json", NOISE_PRIOR_NAME):
        assert absent not in card, absent
    assert "| Target | `a.to_q` |" in card
    assert f'pipe.load_motion("{tmp_path / "m"}")' in card
    assert 'VMCPipeline.from_pretrained("/local/checkpoints/base")' in card
    bare = make_model_card(_motion(distillation=None, training={}), "owner/walk")
    assert "Base model" not in bare and "VMCPipeline.from_pretrained()" in bare
