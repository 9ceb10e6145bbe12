"""The weights directory: atomic save, exact load, complete or refused, clear errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llmseg_ros.config import AUTHORS_PROMPT, PromptFormat
from llmseg_ros.weights.directory import (
    ADAPTER_DIR,
    HEADS_NAME,
    MANIFEST_NAME,
    WeightsManifest,
    WeightsNotFoundError,
    load_module_state,
    load_weights,
    missing_weight_files,
    save_weights,
)
from llmseg_ros.weights.torch_files import read_torch_file

REPO = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"projection": torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))}


def _manifest(**changes) -> WeightsManifest:
    return WeightsManifest(
        **{"method": "llmseg", "base_vlm": "tiny", "hidden_size": 8, "adapter": False, **changes}
    )


class _Adapter:
    """Writes a small but well-formed peft adapter folder."""

    def save_adapter(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True)
        (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
        save_file(
            {"base_model.model.x.lora_A.weight": torch.zeros(2, 2)},
            str(directory / "adapter_model.safetensors"),
        )


def _saved(tmp_path: Path, adapter: bool = True) -> Path:
    return save_weights(
        tmp_path / "w", _manifest(adapter=adapter), _modules(), vlm=_Adapter() if adapter else None
    )


def test_round_trip_is_exact(tmp_path) -> None:
    manifest = _manifest(
        extra={"steps": 3}, prompt=AUTHORS_PROMPT, mask_pooling="sam", sam_downscale="truncate"
    )
    mods = _modules()
    save_weights(tmp_path / "w", manifest, mods)
    loaded = load_weights(tmp_path / "w")
    assert loaded.manifest == manifest
    assert loaded.manifest.prompt.answer == "[SEG]." and loaded.manifest.seg_token == "[SEG]"
    assert loaded.adapter_dir is None
    for key, value in mods["projection"].state_dict().items():
        assert torch.equal(loaded.state_dicts["projection"][key], value)


def test_manifests_from_before_the_prompt_format_mean_ours(tmp_path) -> None:
    path = _saved(tmp_path)
    data = json.loads((path / MANIFEST_NAME).read_text())
    for key in ("prompt", "adapter", "dinov2_pos_interpolation", "sam_downscale", "mask_pooling"):
        del data[key]
    data["seg_token"] = "<SEG>"
    (path / MANIFEST_NAME).write_text(json.dumps(data))
    manifest = load_weights(path).manifest
    assert manifest.prompt == PromptFormat() and manifest.adapter
    assert (manifest.dinov2_pos_interpolation, manifest.sam_downscale, manifest.mask_pooling) == (
        "transformers",
        "round",
        "input",
    )


def test_overwrite_replaces_and_leaves_no_temporaries(tmp_path) -> None:
    save_weights(tmp_path / "w", _manifest(), _modules())
    save_weights(tmp_path / "w", _manifest(method="lisa"), _modules())
    assert load_weights(tmp_path / "w").manifest.method == "lisa"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_failed_save_keeps_the_previous_directory(tmp_path) -> None:
    manifest = _manifest()
    save_weights(tmp_path / "w", manifest, _modules())

    class Broken:
        def save_adapter(self, directory) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_weights(tmp_path / "w", _manifest(adapter=True), _modules(), vlm=Broken())
    assert load_weights(tmp_path / "w").manifest == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_manifest_must_say_whether_there_is_an_adapter(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"manifest\.adapter is True but no VLM adapter was given"):
        save_weights(tmp_path / "w", _manifest(adapter=True), _modules())
    with pytest.raises(ValueError, match=r"manifest\.adapter is False but a VLM adapter was given"):
        save_weights(tmp_path / "w", _manifest(adapter=False), _modules(), vlm=_Adapter())


def test_missing_files_are_named(tmp_path) -> None:
    with pytest.raises(WeightsNotFoundError) as info:
        load_weights(tmp_path / "nowhere")
    for name in (MANIFEST_NAME, HEADS_NAME, f"{ADAPTER_DIR}/adapter_config.json"):
        assert str(tmp_path / "nowhere" / name) in str(info.value)
    assert "training/train.py" in str(info.value) and "import-weights" in str(info.value)


def test_a_directory_without_its_adapter_is_refused(tmp_path) -> None:
    """Issue 15 item 4: no adapter/ used to load and run with no LoRA and no trained <SEG> rows."""
    path = _saved(tmp_path)
    assert missing_weight_files(path) == [] and load_weights(path).adapter_dir == path / ADAPTER_DIR
    shutil.rmtree(path / ADAPTER_DIR)
    expected = [path / ADAPTER_DIR / "adapter_config.json", path / ADAPTER_DIR / "adapter_model.safetensors"]
    assert missing_weight_files(path) == expected
    with pytest.raises(WeightsNotFoundError, match=r"adapter_config\.json"):
        load_weights(path)
    # half an adapter is refused too
    _Adapter().save_adapter(path / ADAPTER_DIR)
    (path / ADAPTER_DIR / "adapter_model.safetensors").unlink()
    assert missing_weight_files(path) == expected[1:]


def test_a_bundled_vlm_must_be_there(tmp_path) -> None:
    path = save_weights(tmp_path / "w", _manifest(base_vlm="./vlm"), _modules())
    assert missing_weight_files(path) == [path / "vlm" / "config.json"]
    with pytest.raises(ValueError, match="must name a folder inside the weights directory"):
        _manifest(base_vlm="./../elsewhere")


def test_pipeline_refuses_weights_without_their_adapter(tiny_config_factory, tmp_path: Path) -> None:
    """The tiny profile's weights minus adapter/: refused before anything runs (base: ran with no LoRA)."""
    from llmseg_ros.cli import EXIT_MISSING_WEIGHTS, main
    from llmseg_ros.pipeline import ReasonSegmenter

    config = tiny_config_factory("llmseg")
    broken = tmp_path / "weights"
    shutil.copytree(config.weights_dir, broken)
    shutil.rmtree(broken / ADAPTER_DIR)
    with pytest.raises(WeightsNotFoundError, match="adapter"):
        ReasonSegmenter(config.replace(weights_dir=str(broken))).load()
    image = tmp_path / "image.png"
    import cv2

    cv2.imwrite(str(image), np.full((32, 32, 3), 128, np.uint8))
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config.replace(weights_dir=str(broken)).to_dict()))
    argv = ["segment", "--config", str(config_file), "--image", str(image), "--instruction", "the cup"]
    assert main([*argv, "--out", str(tmp_path / "mask.png")]) == EXIT_MISSING_WEIGHTS
    assert not (tmp_path / "mask.png").exists()


def test_readme_lists_what_missing_weight_files_requires(tmp_path) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    path = _saved(tmp_path)
    shutil.rmtree(path)
    for required in missing_weight_files(path):
        assert str(required.relative_to(path)) in readme
    assert '"adapter": false' in readme and "vlm/config.json" in readme


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "must be a JSON object, got a list"),
        ("null", "must be a JSON object, got null"),
        ('"llmseg"', "must be a JSON object, got a string"),
        ("{not json", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not UTF-8 text"),
    ],
)
def test_manifest_that_is_not_an_object(tmp_path, content, message) -> None:
    path = _saved(tmp_path)
    target = path / MANIFEST_NAME
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        load_weights(path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hidden_size", "64", "'hidden_size' must be an integer, got str"),
        ("hidden_size", True, "'hidden_size' must be an integer, got bool"),
        ("method", 5, "'method' must be a string"),
        ("lora", [8, 16], "'lora' must be a JSON object"),
        ("adapter", "yes", "'adapter' must be true or false"),
        ("embed_size", 900, "embed_size must be a positive multiple of 14"),
        ("prompt", "llava_v1", "'prompt' must be a JSON object"),
        ("prompt", {"answer": "no token"}, "answer must contain the seg_token"),
        ("prompt", {"conversation": 3}, r"prompt'.conversation must be a str"),
        ("mask_pooling", "everywhere", "mask_pooling must be one of"),
        ("format", "something", r"'format' must be 'llmseg_ros\.weights'"),
    ],
)
def test_manifest_with_wrong_fields(tmp_path, field, value, message) -> None:
    path = _saved(tmp_path)
    data = json.loads((path / MANIFEST_NAME).read_text())
    data[field] = value
    (path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_weights(path)
    with pytest.raises(ValueError, match="method must be 'llmseg' or 'lisa'"):
        WeightsManifest(method="x", base_vlm="t", hidden_size=8)


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": os.urandom(200)}[how])


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_damaged_heads_file(tmp_path, how) -> None:
    path = _saved(tmp_path)
    _damage(path / HEADS_NAME, how)
    with pytest.raises(ValueError, match=rf"{HEADS_NAME}: not a readable safetensors file"):
        load_weights(path)


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_damaged_adapter_files(tmp_path, how) -> None:
    path = _saved(tmp_path)
    _damage(path / ADAPTER_DIR / "adapter_model.safetensors", how)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: not a readable safetensors file"):
        load_weights(path)
    _Adapter().save_adapter(tmp_path / "fresh")
    shutil.copy(tmp_path / "fresh" / "adapter_model.safetensors", path / ADAPTER_DIR)
    (path / ADAPTER_DIR / "adapter_config.json").write_text("[]")
    with pytest.raises(ValueError, match="not a peft adapter config"):
        load_weights(path)


def test_tensors_that_do_not_fit_are_named() -> None:
    module = torch.nn.Linear(4, 2)
    good = {k: v.clone() for k, v in module.state_dict().items()}
    load_module_state(module, good, "w")
    with pytest.raises(ValueError, match=r"wrong shape \[weight: \(3, 4\) \(expected \(2, 4\)\)\]"):
        load_module_state(module, {**good, "weight": torch.zeros(3, 4)}, "w")
    with pytest.raises(ValueError, match=r"missing \[bias\].*unexpected \[extra\]"):
        load_module_state(module, {"weight": good["weight"], "extra": torch.zeros(1)}, "w")


def test_pipeline_refuses_misshapen_heads(tiny_config_factory, tmp_path: Path) -> None:
    """Issue 15 item 10: a tensor of the wrong shape / an unexpected key is a ValueError naming it."""
    from safetensors.torch import load_file, save_file

    from llmseg_ros.pipeline import ReasonSegmenter

    config = tiny_config_factory("llmseg")
    broken = tmp_path / "weights"
    shutil.copytree(config.weights_dir, broken)
    heads = load_file(str(broken / HEADS_NAME))
    heads["selector.iop_head.2.weight"] = torch.zeros(2, 128)
    heads["selector.surprise"] = torch.zeros(1)
    save_file(heads, str(broken / HEADS_NAME))
    with pytest.raises(
        ValueError, match=r"'selector\.\*' tensors.*unexpected \[surprise\].*iop_head\.2\.weight: \(2, 128\)"
    ):
        ReasonSegmenter(config.replace(weights_dir=str(broken))).load()


class _Payload:
    """A pickle that runs code when unpickled (it would create a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_malicious_checkpoint_is_refused_without_running(tmp_path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "x": _Payload(marker)}, evil)
    with pytest.raises(ValueError, match="refused: its pickle calls"):
        read_torch_file(evil)
    assert not marker.exists()


def test_malicious_sam_checkpoint_is_a_clean_cli_error(tiny_profile_dir, tmp_path, capsys) -> None:
    """A planted SAM checkpoint: exit code 2 and one line, no traceback, nothing run."""
    import cv2

    from llmseg_ros.cli import EXIT_USAGE, main

    marker = tmp_path / "pwned"
    evil = tmp_path / "sam.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1, 4, 4, 8), "x": _Payload(marker)}, evil)
    image = tmp_path / "image.png"
    cv2.imwrite(str(image), np.full((32, 32, 3), 128, np.uint8))
    argv = [
        "segment",
        "--profile",
        "tiny",
        "--tiny-dir",
        str(tiny_profile_dir),
        "--sam-checkpoint",
        str(evil),
    ]
    code = main([*argv, "--image", str(image), "--instruction", "the cup", "--out", str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "refused" in err and "Traceback" not in err
    assert not marker.exists()
