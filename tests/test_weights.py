"""The weights directory: atomic save, exact load, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from llmseg_ros.weights.directory import (
    HEADS_NAME,
    MANIFEST_NAME,
    WeightsManifest,
    WeightsNotFoundError,
    load_weights,
    save_weights,
)


def _modules() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"projection": torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))}


def test_round_trip_is_exact(tmp_path) -> None:
    manifest = WeightsManifest(method="llmseg", base_vlm="tiny", hidden_size=8, extra={"steps": 3})
    mods = _modules()
    save_weights(tmp_path / "w", manifest, mods)
    loaded = load_weights(tmp_path / "w")
    assert loaded.manifest == manifest
    assert loaded.adapter_dir is None
    for key, value in mods["projection"].state_dict().items():
        assert torch.equal(loaded.state_dicts["projection"][key], value)


def test_overwrite_replaces_and_leaves_no_temporaries(tmp_path) -> None:
    manifest = WeightsManifest(method="llmseg", base_vlm="tiny", hidden_size=8)
    save_weights(tmp_path / "w", manifest, _modules())
    manifest2 = WeightsManifest(method="lisa", base_vlm="tiny", hidden_size=8)
    save_weights(tmp_path / "w", manifest2, _modules())
    assert load_weights(tmp_path / "w").manifest.method == "lisa"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_failed_save_keeps_the_previous_directory(tmp_path) -> None:
    manifest = WeightsManifest(method="llmseg", base_vlm="tiny", hidden_size=8)
    save_weights(tmp_path / "w", manifest, _modules())

    class Broken:
        def save_adapter(self, directory) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_weights(tmp_path / "w", manifest, _modules(), vlm=Broken())
    assert load_weights(tmp_path / "w").manifest == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_missing_files_are_named(tmp_path) -> None:
    with pytest.raises(WeightsNotFoundError) as info:
        load_weights(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / MANIFEST_NAME) in str(info.value)
    assert str(tmp_path / "nowhere" / HEADS_NAME) in str(info.value)
    assert "training/train.py" in str(info.value)


def test_bad_manifest(tmp_path) -> None:
    save_weights(tmp_path / "w", WeightsManifest(method="llmseg", base_vlm="t", hidden_size=8), _modules())
    path = tmp_path / "w" / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["format"] = "something"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"'format' must be 'llmseg_ros\.weights'"):
        load_weights(tmp_path / "w")
    with pytest.raises(ValueError, match="method must be 'llmseg' or 'lisa'"):
        WeightsManifest(method="x", base_vlm="t", hidden_size=8)
