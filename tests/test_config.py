"""SegmenterConfig and friends: validation messages and serialisation."""

from __future__ import annotations

import json

import pytest
import torch

from llmseg_ros.config import LoraSettings, ProposalConfig, SegmenterConfig, SelectionConfig
from llmseg_ros.utils.device import resolve_device, resolve_dtype


def test_defaults_match_the_reference() -> None:
    cfg = SegmenterConfig()
    assert cfg.method == "llmseg"
    assert (cfg.proposals.points_per_side, cfg.proposals.points_per_batch) == (32, 64)
    assert (cfg.proposals.pred_iou_thresh, cfg.proposals.stability_score_thresh) == (0.88, 0.95)
    assert cfg.proposals.box_nms_thresh == 0.7
    assert cfg.proposals.max_proposals == 50
    assert cfg.proposals.max_long_side == 1024
    assert (cfg.selection.strategy, cfg.selection.iop_threshold) == ("iop_threshold", 0.5)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 16, 0.05)
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.embed_size == 896


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: SegmenterConfig(method="magic"), "method must be one of"),
        (lambda: SegmenterConfig(device="tpu"), "device must be"),
        (lambda: SegmenterConfig(dtype="float8"), "dtype must be one of"),
        (lambda: SegmenterConfig(embed_size=900), "embed_size must be a positive multiple of 14"),
        (lambda: SelectionConfig(strategy="best"), "strategy must be one of"),
        (lambda: SelectionConfig(iop_threshold=1.5), r"iop_threshold must be in \[0.0, 1.0\], got 1.5"),
        (lambda: ProposalConfig(points_per_side=0), "points_per_side must be >= 1, got 0"),
        (lambda: ProposalConfig(implementation="gpu"), "implementation must be one of"),
        (lambda: LoraSettings(r=0), "r must be >= 1"),
        (lambda: SegmenterConfig(selection=3), "selection must be a SelectionConfig or a dict"),  # type: ignore[arg-type]
    ],
)
def test_validation_names_the_field(factory, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()


def test_round_trip_through_json_and_yaml(tmp_path) -> None:
    cfg = SegmenterConfig(
        method="vlm_marks",
        sam_checkpoint="sam.pth",
        selection=SelectionConfig(strategy="top1_iou", iop_threshold=0.3),
        proposals=ProposalConfig(points_per_side=16),
        lora=LoraSettings(r=4, target_modules=("q_proj",)),
    )
    data = cfg.to_dict()
    (tmp_path / "c.json").write_text(json.dumps(data))
    assert SegmenterConfig.from_file(tmp_path / "c.json") == cfg
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    assert SegmenterConfig.from_file(tmp_path / "c.yaml") == cfg


def test_unknown_fields_and_bad_files_are_reported(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['colour'\]"):
        SegmenterConfig.from_dict({"colour": "red"})
    with pytest.raises(ValueError, match="cannot read config file"):
        SegmenterConfig.from_file(tmp_path / "absent.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a mapping"):
        SegmenterConfig.from_file(tmp_path / "list.json")


def test_device_and_dtype_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
