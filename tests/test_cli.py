"""The `llmseg` command: tiny run, missing weights, bad images, offline fetch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import pytest

from llmseg_ros import cli
from llmseg_ros.weights import fetch

DEMO = Path(__file__).resolve().parents[1] / "llmseg_ros" / "assets" / "kitchen.jpg"


def test_segment_with_the_tiny_profile(tiny_profile_dir, tmp_path, capsys) -> None:
    out, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    code = cli.main(
        [
            "segment",
            "--profile",
            "tiny",
            "--tiny-dir",
            str(tiny_profile_dir),
            "--image",
            str(DEMO),
            "--instruction",
            "something I could stand on to reach the shelf",
            "--out",
            str(out),
            "--overlay",
            str(overlay),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "TINY PROFILE" in printed and "timings (s):" in printed
    for stage in ("proposals", "mask_embeddings", "vlm", "selector", "total"):
        assert stage in printed
    mask = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    image = cv2.imread(str(DEMO))
    assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 255}
    assert cv2.imread(str(overlay)).shape == image.shape


def test_json_output(tiny_profile_dir, tmp_path, capsys) -> None:
    args = ["segment", "--profile", "tiny", "--tiny-dir", str(tiny_profile_dir), "--json"]
    args += ["--image", str(DEMO), "--instruction", "the bin", "--out", str(tmp_path / "m.png")]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    data = json.loads(text[text.index("{") :])
    assert data["method"] == "llmseg" and "total" in data["timings_s"]


def test_missing_weights_names_every_file(tmp_path, capsys) -> None:
    code = cli.main(
        [
            "segment",
            "--image",
            str(DEMO),
            "--instruction",
            "the cup",
            "--out",
            str(tmp_path / "m.png"),
            "--sam-checkpoint",
            str(tmp_path / "sam_vit_h_4b8939.pth"),
            "--weights",
            str(tmp_path / "weights"),
            "--dinov2",
            str(tmp_path / "dinov2-large"),
        ]
    )
    err = capsys.readouterr().err
    assert code == cli.EXIT_MISSING_WEIGHTS
    assert str(tmp_path / "sam_vit_h_4b8939.pth") in err and "llmseg fetch-weights" in err
    assert str(tmp_path / "weights" / "llmseg_weights.json") in err
    assert str(tmp_path / "weights" / "heads.safetensors") in err
    assert str(tmp_path / "dinov2-large") in err
    assert not (tmp_path / "m.png").exists()


def test_defaults_without_weights_fail_clearly(tmp_path, capsys) -> None:
    code = cli.main(["segment", "--image", str(DEMO), "--instruction", "x", "--out", str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_MISSING_WEIGHTS
    assert "SAM checkpoint: not set" in err and "trained weights: not set" in err


@pytest.mark.parametrize("content", [b"", b"not an image at all"])
def test_unreadable_image(tmp_path, capsys, content: bytes) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(content)
    code = cli.main(
        ["segment", "--profile", "tiny", "--image", str(bad), "--instruction", "x", "--out", "m.png"]
    )
    assert code == cli.EXIT_USAGE
    assert f"image {bad} could not be decoded" in capsys.readouterr().err


def test_missing_image(tmp_path, capsys) -> None:
    missing = tmp_path / "nope.png"
    code = cli.main(["segment", "--image", str(missing), "--instruction", "x", "--out", "m.png"])
    assert code == cli.EXIT_USAGE
    assert f"image {missing} does not exist" in capsys.readouterr().err


def test_fetch_fails_clearly_offline(tmp_path, monkeypatch, capsys) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(fetch.urllib.request, "urlopen", offline)
    code = cli.main(["fetch-weights", "--dir", str(tmp_path), "--dinov2", "", "--vlm", ""])
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAIL
    assert "sam_vit_h_4b8939.pth" in err and "offline" in err
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_fetch_offline_lists_every_file_and_writes_what_it_got(tmp_path, monkeypatch, capsys) -> None:
    import huggingface_hub

    def offline_url(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    def offline_hub(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line of the hub's message")

    monkeypatch.setattr(fetch.urllib.request, "urlopen", offline_url)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline_hub)
    sam_url = fetch.SAM_RELEASE + "sam_vit_h_4b8939.pth"
    code = cli.main(["fetch-weights", "--dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAIL
    assert "could not get 3 of 3 models" in err
    assert (
        f"download {sam_url} on a connected machine and copy it to {tmp_path / 'sam_vit_h_4b8939.pth'}" in err
    )
    for repo_id, folder in (
        ("facebook/dinov2-large", "dinov2-large"),
        ("llava-hf/llava-1.5-7b-hf", "llava-1.5-7b-hf"),
    ):
        assert (
            f"`hf download {repo_id} --local-dir {folder}` and copy the folder to {tmp_path / folder}" in err
        )
    assert not (tmp_path / "llmseg_config.json").exists()  # nothing to point at

    (tmp_path / "sam_vit_h_4b8939.pth").write_bytes(b"copied by hand")
    code = cli.main(["fetch-weights", "--dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAIL
    assert "could not get 2 of 3 models" in err and sam_url not in err
    assert "facebook/dinov2-large" in err and "llava-hf/llava-1.5-7b-hf" in err
    written = json.loads((tmp_path / "llmseg_config.json").read_text())
    assert written == {"sam_model_type": "vit_h", "sam_checkpoint": str(tmp_path / "sam_vit_h_4b8939.pth")}


def test_download_checks_the_md5_tag(tmp_path) -> None:
    import hashlib
    import io

    payload = b"checkpoint bytes"

    class Response(io.BytesIO):
        headers: ClassVar[dict[str, str]] = {"Content-Length": str(len(payload))}

    tag = hashlib.md5(payload, usedforsecurity=False).hexdigest()[:6]
    got = fetch.download_url(
        "u", tmp_path / "a.pth", expected_md5_prefix=tag, opener=lambda *a, **k: Response(payload)
    )
    assert got.read_bytes() == payload
    with pytest.raises(fetch.FetchError, match="checksum mismatch"):
        fetch.download_url(
            "u", tmp_path / "b.pth", expected_md5_prefix="000000", opener=lambda *a, **k: Response(payload)
        )
    assert not (tmp_path / "b.pth").exists()
    assert fetch.md5_tag("sam_vit_h_4b8939.pth") == "4b8939"


def test_hub_download_error_is_clear(tmp_path, monkeypatch) -> None:
    import huggingface_hub

    def offline(**kwargs):
        raise OSError("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(fetch.FetchError, match="cannot download facebook/dinov2-large"):
        fetch.fetch_hub_model("facebook/dinov2-large", tmp_path)


def test_console_entry_point_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmseg_ros.cli", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert "segment" in result.stdout and "fetch-weights" in result.stdout


@pytest.mark.parametrize("verbose", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_segment_output_is_free_of_dependency_chatter(tiny_profile_dir, tmp_path, verbose: bool) -> None:
    """Without --verbose a run prints its own lines only: no loading bars, warnings or dependency logs."""
    args = ["segment", "--profile", "tiny", "--tiny-dir", str(tiny_profile_dir), "--image", str(DEMO)]
    args += ["--instruction", "the bin", "--out", str(tmp_path / "m.png")]
    result = subprocess.run(
        [sys.executable, "-m", "llmseg_ros.cli", *args, *(["--verbose"] if verbose else [])],
        capture_output=True,
        text=True,
        check=False,
        cwd=DEMO.parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert "TINY PROFILE" in result.stdout and "mask written to" in result.stdout
    if verbose:  # the dependencies' output is there, only shown on request
        assert "Loading weights" in result.stderr
    else:
        assert result.stderr == ""
        assert not re.search(r"\d+%\||it/s|Warning|Loading weights", result.stdout)
