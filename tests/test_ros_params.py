"""ROS parameters ↔ SegmenterConfig / node settings, and config/perception.yaml."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from ros_testing import REPO

from llmseg_ros.config import LoraSettings, ProposalConfig, SegmenterConfig, SelectionConfig
from llmseg_ros.ros.params import (
    DESCRIPTIONS,
    SKIPPED_CONFIG_FIELDS,
    NodeSettings,
    check_overrides,
    config_to_parameters,
    default_parameters,
    handler_settings,
    parameter_table_markdown,
    parameters_to_config,
    parameters_to_settings,
    parameters_yaml,
    settings_to_parameters,
    split_parameters,
)


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def custom_config() -> SegmenterConfig:
    return SegmenterConfig(
        method="lisa",
        sam_checkpoint="/models/sam_vit_b.pth",
        sam_model_type="vit_b",
        weights_dir="/models/llmseg",
        device="cuda:1",
        dtype="bfloat16",
        vlm_quantization="4bit",
        embed_size=448,
        max_instruction_chars=200,
        proposals=ProposalConfig(points_per_side=16, pred_iou_thresh=0.8, implementation="reference"),
        selection=SelectionConfig(strategy="topk_iou_iop_threshold", iop_threshold=0.3, top_k=3),
        lora=LoraSettings(r=16, alpha=32, target_modules=("q_proj", "k_proj", "v_proj")),
    )


def test_names_are_flat_and_dotted() -> None:
    params = config_to_parameters(custom_config())
    assert params["models.sam_checkpoint"] == "/models/sam_vit_b.pth"
    assert params["selection.strategy"] == "topk_iou_iop_threshold"
    assert params["proposals.points_per_side"] == 16
    assert params["lora.target_modules"] == ["q_proj", "k_proj", "v_proj"]
    assert params["device"] == "cuda:1" and params["max_instruction_chars"] == 200
    assert config_to_parameters(SegmenterConfig())["models.sam_checkpoint"] == ""  # None → ""
    assert all(isinstance(v, (bool, int, float, str, list)) for v in params.values())


def test_config_round_trips_through_parameters() -> None:
    config = custom_config()
    assert parameters_to_config(config_to_parameters(config)) == config
    assert parameters_to_config(config_to_parameters(SegmenterConfig())) == SegmenterConfig()


def test_every_config_field_is_a_parameter() -> None:
    params = config_to_parameters(SegmenterConfig())
    expected = 0
    for fld in dataclasses.fields(SegmenterConfig):
        value = getattr(SegmenterConfig(), fld.name)
        if fld.name in SKIPPED_CONFIG_FIELDS:
            continue
        expected += len(dataclasses.fields(value)) if dataclasses.is_dataclass(value) else 1
    assert len(params) == expected


def test_wrong_types_and_values_name_the_parameter() -> None:
    with pytest.raises(
        ValueError, match=r"parameter proposals\.points_per_side must be an integer, got '32'"
    ):
        parameters_to_config({"proposals.points_per_side": "32"})
    with pytest.raises(ValueError, match="parameter use_depth must be a bool"):
        parameters_to_settings({"use_depth": 1})
    with pytest.raises(ValueError, match="strategy must be one of"):
        parameters_to_config({"selection.strategy": "best"})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) 'selection.stratgy'"):
        split_parameters({"selection.stratgy": "top1_iou"})
    assert parameters_to_config({"selection.iop_threshold": 1}).selection.iop_threshold == 1.0  # int → float


def test_node_settings_mapping_and_validation() -> None:
    settings = NodeSettings(
        use_depth=True,
        image_reliability="reliable",
        image_history_depth=2,
        camera_info_history_depth=7,
        request_timeout=12.5,
    )
    params = settings_to_parameters(settings)
    assert params["qos.image.reliability"] == "reliable" and params["qos.image.history_depth"] == 2
    assert params["qos.depth.reliability"] == "best_effort" and params["qos.camera_info.history_depth"] == 7
    assert params["sync.slop"] == 0.05
    assert parameters_to_settings(params) == settings
    assert settings.input_qos("image") == ("reliable", 2)
    assert settings.input_qos("depth") == ("best_effort", 5)  # the sensor-data profile's depth
    assert settings.input_qos("camera_info") == ("best_effort", 7)
    with pytest.raises(ValueError, match="input must be one of"):
        settings.input_qos("points")
    with pytest.raises(
        ValueError, match=r"qos.depth.reliability must be one of \['best_effort', 'reliable'\]"
    ):
        NodeSettings(depth_reliability="sensor_data")
    with pytest.raises(ValueError, match="request_timeout must be a finite number of seconds > 0, got 0"):
        NodeSettings(request_timeout=0.0)
    with pytest.raises(ValueError, match=r"qos\.camera_info\.history_depth must be >= 1"):
        NodeSettings(camera_info_history_depth=0)
    with pytest.raises(ValueError, match="profile must be one of"):
        NodeSettings(profile="huge")
    config, node = split_parameters({**default_parameters(), "selection.top_k": 7, "precompute": True})
    assert config.selection.top_k == 7 and node.precompute
    limits = handler_settings(config, settings, "/cam/image")
    assert (limits.max_instruction_chars, limits.request_timeout_s, limits.image_topic) == (
        1000,
        12.5,
        "/cam/image",
    )


def test_start_up_values_are_checked_against_the_parameter_types() -> None:
    check = check_overrides(
        {
            "request_timeout": "soon",
            "stamp_tolerance": 1,
            "use_depth": 1,
            "lora.target_modules": ["q_proj"],
            "selection.stratgy": "top1_iou",
            "use_sim_time": True,
            "frame_buffer_size": 4,
        },
        declared_elsewhere=["use_sim_time"],
        node_name="/robot/llmseg_perception",
    )
    assert check.coerced == {"stamp_tolerance": 1.0}
    assert set(check.mistyped) == {"request_timeout", "use_depth"}
    assert check.mistyped["request_timeout"] == (
        "parameter request_timeout is set to 'soon' (a string) at start-up; expected a number like 60.0. "
        "The node will not configure until it is fixed in the parameters file or with: "
        "ros2 param set /robot/llmseg_perception request_timeout <value>"
    )
    assert "expected a bool like false" in check.mistyped["use_depth"]
    assert check.unknown == ["selection.stratgy"]
    problems = check.problems()
    assert len(problems) == 3
    assert "unknown parameter(s) 'selection.stratgy' (did you mean 'selection.strategy'?)" in problems[-1]
    assert check_overrides({}).problems() == []


def test_unknown_parameters_fail_with_the_nearest_names() -> None:
    with pytest.raises(
        ValueError, match=r"'qos\.image\.reliabilty' \(did you mean 'qos\.image\.reliability'\?\)"
    ):
        split_parameters({**default_parameters(), "qos.image.reliabilty": "reliable"})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) 'zzz': this node has no such parameter"):
        split_parameters({"zzz": 1})


def test_perception_yaml_documents_every_parameter_with_its_default() -> None:
    text = (REPO / "config" / "perception.yaml").read_text()
    assert text == parameters_yaml(), (
        "config/perception.yaml is out of date; regenerate it with: python3 -c "
        "'from llmseg_ros.ros.params import parameters_yaml; print(parameters_yaml(), end=\"\")' > config/perception.yaml"
    )
    data = yaml.safe_load(text)
    params = flatten(data["/**"]["ros__parameters"])
    defaults = default_parameters()
    assert params == defaults
    for name in defaults:  # a comment line precedes every parameter
        key = name.rsplit(".", 1)[-1]
        lines = text.splitlines()
        index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:"))
        assert lines[index - 1].strip().startswith("#"), name
    for name, value in defaults.items():  # floats written as floats, or ROS rejects the file
        assert type(params[name]) is type(value), name


def test_every_parameter_has_a_description_and_a_table_row() -> None:
    defaults = default_parameters()
    assert set(DESCRIPTIONS) == set(defaults)
    table = parameter_table_markdown()
    assert all(f"| `{name}` |" in table for name in defaults)
    assert all(row.count("|") == 4 for row in table.splitlines())  # no stray pipes in descriptions
