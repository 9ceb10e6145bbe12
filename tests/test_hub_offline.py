"""Hub models offline: missing ones are reported before any model loads, cached ones load
from the cache, and every download hint names a command the installed huggingface_hub has."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from llmseg_ros import cli
from llmseg_ros.config import SegmenterConfig
from llmseg_ros.models.components import missing_inputs
from llmseg_ros.weights import fetch
from llmseg_ros.weights.directory import missing_weight_files

DEMO = Path(__file__).resolve().parents[1] / "llmseg_ros" / "assets" / "kitchen.jpg"


@pytest.fixture
def closed_port() -> int:
    """A local TCP port nothing listens on (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def listening_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
def hub_at(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Point the hub client at a local endpoint and an empty cache, offline mode off."""

    def configure(port: int) -> Path:
        cache = tmp_path / "hub_cache"
        cache.mkdir(exist_ok=True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.delenv(var, raising=False)
        return cache

    return configure


def cache_model(cache: Path, repo_id: str) -> Path:
    """Lay out ``repo_id`` in the hub cache the way ``huggingface_hub`` does (config.json only)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return snapshot


def local_inputs(tmp_path: Path) -> list[str]:
    """CLI arguments for a SAM file and a trained-weights directory that exist (contents unread)."""
    sam = tmp_path / "sam_vit_h_4b8939.pth"
    sam.write_bytes(b"")
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("llmseg_weights.json", "heads.safetensors"):
        (weights / name).write_bytes(b"")
    return ["--sam-checkpoint", str(sam), "--weights", str(weights)]


def test_unreachable_reason(hub_at, closed_port: int, listening_port: int, monkeypatch) -> None:
    from llmseg_ros.utils import hub

    hub_at(closed_port)
    reason = hub.unreachable_reason()
    assert reason is not None and f"cannot connect to 127.0.0.1:{closed_port}" in reason
    hub_at(listening_port)
    assert hub.unreachable_reason() is None
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE" in (hub.unreachable_reason() or "")


def test_unreachable_reason_does_not_wait_on_a_hanging_lookup(
    hub_at, listening_port: int, monkeypatch
) -> None:
    from llmseg_ros.utils import hub

    hub_at(listening_port)
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(hub.socket, "create_connection", hang)
    try:
        assert (
            hub.unreachable_reason(timeout_s=0.2) == f"no answer from 127.0.0.1:{listening_port} within 0.2 s"
        )
    finally:
        release.set()


def test_cached_snapshot(hub_at, closed_port: int) -> None:
    from llmseg_ros.utils import hub

    cache = hub_at(closed_port)
    snapshot = cache_model(cache, "owner/model")
    assert hub.cached_snapshot("owner/model") == snapshot
    assert hub.cached_snapshot("owner/other") is None
    assert hub.cached_snapshot("owner/not a valid id") is None


def test_offline_uncached_hub_models_are_missing_before_loading(
    hub_at, closed_port: int, tmp_path: Path, monkeypatch, capsys
) -> None:
    hub_at(closed_port)
    from llmseg_ros.pipeline import ReasonSegmenter

    def must_not_load(self):
        raise AssertionError("models were loaded although the hub models are missing")

    monkeypatch.setattr(ReasonSegmenter, "load", must_not_load)
    args = ["segment", "--image", str(DEMO), "--instruction", "x", "--out", str(tmp_path / "m.png")]
    code = cli.main([*args, *local_inputs(tmp_path)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_MISSING_WEIGHTS
    assert "Retrying" not in err
    for repo_id in ("facebook/dinov2-large", "llava-hf/llava-1.5-7b-hf"):
        assert f"{repo_id} is not in the local Hugging Face cache and the hub cannot be reached" in err
        assert f"`hf download {repo_id} --local-dir weights/{repo_id.split('/')[1]}`" in err
    assert f"127.0.0.1:{closed_port}" in err


def test_missing_inputs_lists_local_and_hub_problems_together(
    hub_at, closed_port: int, tmp_path: Path
) -> None:
    cache = hub_at(closed_port)
    cache_model(cache, "facebook/dinov2-large")
    config = SegmenterConfig(sam_checkpoint=str(tmp_path / "absent.pth"), weights_dir=str(tmp_path / "w"))
    problems = missing_inputs(config)
    assert any("absent.pth not found" in p for p in problems)
    assert any(p.startswith("VLM: llava-hf/llava-1.5-7b-hf is not in the local") for p in problems)
    assert not any("dinov2" in p for p in problems)  # cached: loads offline
    expected = len(missing_weight_files(tmp_path / "w"))  # manifest, heads and the LoRA adapter's files
    assert expected >= 2
    assert len([p for p in problems if "trained weights" in p]) == expected


def test_reachable_hub_models_are_not_missing(hub_at, listening_port: int, tmp_path: Path) -> None:
    hub_at(listening_port)
    config = SegmenterConfig(method="vlm_marks", sam_checkpoint=str(tmp_path / "absent.pth"))
    assert [p.split(":")[0] for p in missing_inputs(config)] == ["SAM checkpoint"]


def test_offline_cached_hub_models_load_from_the_cache(hub_at, closed_port: int, listening_port: int) -> None:
    from llmseg_ros.cli.common import prefer_cached_models

    cache = hub_at(closed_port)
    snapshot = cache_model(cache, "llava-hf/llava-1.5-7b-hf")
    config = SegmenterConfig(sam_checkpoint="sam.pth", weights_dir="w")
    offline = prefer_cached_models(config)
    assert offline.vlm == str(snapshot)
    assert offline.dinov2 == config.dinov2  # not cached: left for the missing-inputs check
    hub_at(listening_port)
    assert prefer_cached_models(config) == config  # online: the hub client checks for updates


def _hub_commands() -> set[str]:
    return {
        ep.name for ep in entry_points(group="console_scripts") if ep.value.startswith("huggingface_hub.")
    }


def _hints(message: str) -> list[str]:
    return re.findall(r"`((?:hf|huggingface-cli) [^`]*)`", message)


def _error_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, closed_port: int, hub_at
) -> dict[str, str]:
    """Every place that prints a hub download hint, made to fail offline."""
    import huggingface_hub

    from llmseg_ros.models.chat_vlm import ChatVLM
    from llmseg_ros.models.embeddings import MaskEmbedder
    from llmseg_ros.models.vlm import SegVLM

    messages: dict[str, str] = {}

    def offline(**kwargs):
        raise OSError("offline")

    with monkeypatch.context() as patch, pytest.raises(fetch.FetchError) as fetch_error:
        patch.setattr(huggingface_hub, "snapshot_download", offline)
        fetch.fetch_hub_model("facebook/dinov2-large", tmp_path)
    messages["fetch-weights"] = str(fetch_error.value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cpu = {"device": torch.device("cpu"), "dtype": torch.float32}
    for name, load in (
        ("SegVLM hub id", lambda: SegVLM.load("nobody/no-such-vlm", **cpu)),
        ("SegVLM path", lambda: SegVLM.load(str(tmp_path / "no_vlm_dir"), **cpu)),
        ("MaskEmbedder path", lambda: MaskEmbedder.load(str(tmp_path / "no_dinov2_dir"))),
        ("MaskEmbedder hub id", lambda: MaskEmbedder.load("nobody/no-such-dinov2")),
        ("ChatVLM hub id", lambda: ChatVLM.load("nobody/no-such-chat-vlm", **cpu)),
    ):
        with pytest.raises((OSError, ValueError)) as error:
            load()
        messages[name] = str(error.value)
    hub_at(closed_port)
    messages["missing inputs"] = "\n".join(
        missing_inputs(SegmenterConfig(sam_checkpoint="s", weights_dir="w"))
    )
    return messages


def test_download_hints_name_a_command_huggingface_hub_provides(
    tmp_path: Path, monkeypatch, closed_port: int, hub_at
) -> None:
    provided = _hub_commands()
    assert "hf" in provided
    for site, message in _error_messages(tmp_path, monkeypatch, closed_port, hub_at).items():
        hints = _hints(message)
        assert hints, f"{site}: no download command in {message!r}"
        for hint in hints:
            assert hint.split()[0] in provided, f"{site}: `{hint}` is not a command of huggingface_hub"
            assert hint.split()[1] == "download", f"{site}: {hint}"
    usage = subprocess.run(
        [sys.executable, "-m", "huggingface_hub.cli.hf", "download", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert usage.returncode == 0 and "--local-dir" in usage.stdout
