"""ROS parameters ↔ :class:`~llmseg_ros.config.SegmenterConfig` and the node's settings.

Parameter names are flat and dotted (``models.sam_checkpoint``, ``selection.strategy``,
``proposals.points_per_side``, ``qos.reliability``, ...), which is how a nested YAML
parameters file is flattened by ROS 2. Values are ROS parameter types only: ``None`` is
written as ``""`` and tuples as string arrays. Pure functions, no ROS import.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from llmseg_ros.config import SegmenterConfig
from llmseg_ros.ros.handler import HandlerSettings

ParameterValue = bool | int | float | str | list[str]

# Top-level config fields that are grouped under ``models.``.
MODEL_FIELDS = (
    "sam_checkpoint",
    "sam_model_type",
    "dinov2",
    "vlm",
    "weights_dir",
    "detector",
    "vlm_quantization",
    "embed_size",
)
# Config fields that are not parameters (``profile`` is chosen by the node's ``profile``).
SKIPPED_CONFIG_FIELDS = ("profile",)
PROFILES = ("", "tiny")
QOS_RELIABILITY = ("best_effort", "reliable")
# The subscribed inputs, each with its own QoS parameters (qos.<input>.reliability, ...).
INPUTS = ("image", "depth", "camera_info")


@dataclass
class NodeSettings:
    """Parameters of the node itself (not of the segmenter).

    The QoS defaults are ROS 2's sensor-data profile (best effort, volatile, keep last 5):
    a best-effort subscription matches both best-effort and reliable publishers.

    Attributes:
        profile: ``""`` = models from the parameters; ``tiny`` = tiny random models built
            in a temporary directory (tests and demos; the masks are meaningless).
        use_depth: subscribe to ``depth`` + ``camera_info`` (approximate time sync with
            ``image``) and publish masked depth and points.
        frame_buffer_size: frames kept for stamp lookup (and cached features).
        stamp_tolerance: seconds between a requested stamp and a buffered frame's.
        request_timeout: seconds one request may take, waiting for the model included.
        precompute: prepare proposals for each new frame in the background.
        publish_overlay: publish the bgr8 ``overlay`` topic.
        image_reliability: ``image`` subscription reliability, ``best_effort`` or ``reliable``.
        image_history_depth: ``image`` subscription history depth (keep last N).
        depth_reliability, depth_history_depth: the same for ``depth``.
        camera_info_reliability, camera_info_history_depth: the same for ``camera_info``.
        sync_slop: seconds of stamp difference the colour/depth/info sync accepts.
        sync_queue_size: messages per topic the sync keeps while matching.
        track_timeout: seconds (of frame time) a track lives without a confident update.
        max_tracks: tracks alive at once.
    """

    profile: str = ""
    use_depth: bool = False
    frame_buffer_size: int = 10
    stamp_tolerance: float = 0.01
    request_timeout: float = 60.0
    precompute: bool = False
    publish_overlay: bool = True
    image_reliability: str = "best_effort"
    image_history_depth: int = 5
    depth_reliability: str = "best_effort"
    depth_history_depth: int = 5
    camera_info_reliability: str = "best_effort"
    camera_info_history_depth: int = 5
    sync_slop: float = 0.05
    sync_queue_size: int = 10
    track_timeout: float = 5.0
    max_tracks: int = 4

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {list(PROFILES)}, got {self.profile!r}")
        for name in INPUTS:
            value = getattr(self, f"{name}_reliability")
            if value not in QOS_RELIABILITY:
                raise ValueError(
                    f"{NODE_PARAMETERS[f'{name}_reliability']} must be one of {list(QOS_RELIABILITY)}, got {value!r}"
                )
        counts = (
            "frame_buffer_size",
            "sync_queue_size",
            "max_tracks",
            *(f"{name}_history_depth" for name in INPUTS),
        )
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"{NODE_PARAMETERS[name]} must be >= 1, got {getattr(self, name)}")
        for name, low in (
            ("stamp_tolerance", ">= 0"),
            ("request_timeout", "> 0"),
            ("sync_slop", "> 0"),
            ("track_timeout", "> 0"),
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (low == "> 0" and value == 0):
                raise ValueError(
                    f"{NODE_PARAMETERS[name]} must be a finite number of seconds {low}, got {value}"
                )

    def input_qos(self, name: str) -> tuple[str, int]:
        """(reliability, history depth) of the subscription to input ``name`` (one of ``INPUTS``)."""
        if name not in INPUTS:
            raise ValueError(f"input must be one of {list(INPUTS)}, got {name!r}")
        return getattr(self, f"{name}_reliability"), getattr(self, f"{name}_history_depth")


# NodeSettings field → parameter name.
NODE_PARAMETERS = {
    "profile": "profile",
    "use_depth": "use_depth",
    "frame_buffer_size": "frame_buffer_size",
    "stamp_tolerance": "stamp_tolerance",
    "request_timeout": "request_timeout",
    "precompute": "precompute",
    "publish_overlay": "publish_overlay",
    **{f"{name}_reliability": f"qos.{name}.reliability" for name in INPUTS},
    **{f"{name}_history_depth": f"qos.{name}.history_depth" for name in INPUTS},
    "sync_slop": "sync.slop",
    "sync_queue_size": "sync.queue_size",
    "track_timeout": "track_timeout",
    "max_tracks": "max_tracks",
}

DESCRIPTIONS: dict[str, str] = {
    # node
    "profile": "'' = models from the parameters below; 'tiny' = tiny random models (tests/demos, meaningless masks)",
    "use_depth": "also subscribe to depth + camera_info and publish masked_depth, its camera_info and points",
    "frame_buffer_size": "latest frames kept for lookup by stamp (and their cached proposals)",
    "stamp_tolerance": "seconds a requested stamp may differ from a buffered frame's",
    "request_timeout": "seconds one request may take (waiting for the model included) before success=false",
    "precompute": "compute proposals for each new frame in the background (at most one running, one pending)",
    "publish_overlay": "publish the bgr8 overlay topic after each answer",
    "qos.image.reliability": "image subscription reliability: best_effort (matches any publisher) or reliable",
    "qos.depth.reliability": "depth subscription reliability: best_effort (matches any publisher) or reliable",
    "qos.camera_info.reliability": "camera_info subscription reliability: best_effort (matches any publisher) or reliable",
    "qos.image.history_depth": "image subscription history depth (keep last N)",
    "qos.depth.history_depth": "depth subscription history depth (keep last N)",
    "qos.camera_info.history_depth": "camera_info subscription history depth (keep last N)",
    "sync.slop": "seconds of stamp difference accepted when matching image, depth and camera_info",
    "sync.queue_size": "messages per topic kept by the approximate time synchroniser",
    "track_timeout": "seconds (of frame time) a track started with track: true lives without a confident update; then it ends and segmentation says why",
    "max_tracks": "tracks alive at once (reason_segment with track: true beyond it fails)",
    # segmenter
    "method": "segmentation method: llmseg, lisa, grounded, vlm_grounding, vlm_marks",
    "device": "cpu, cuda, cuda:N or auto (CUDA when available)",
    "dtype": "auto (bf16/fp16 on CUDA, fp32 on CPU), float32, float16 or bfloat16",
    "max_instruction_chars": "longest instruction accepted (characters)",
    "models.sam_checkpoint": "path of the SAM .pth checkpoint ('' = none)",
    "models.sam_model_type": "SAM variant: vit_h, vit_l, vit_b, tiny",
    "models.dinov2": "DINOv2 hub id or local directory",
    "models.vlm": "VLM hub id or local directory (LLaVA for llmseg/lisa/grounded)",
    "models.weights_dir": "directory of the trained llmseg_ros weights (selector, projection, LoRA)",
    "models.detector": "Grounding DINO hub id or directory (grounded method)",
    "models.vlm_quantization": "'' (none), 8bit or 4bit VLM loading (bitsandbytes, CUDA only)",
    "models.embed_size": "DINOv2 input long side in pixels (multiple of 14; 896 in LLM-Seg)",
    "proposals.points_per_side": "SAM everything-mode grid: points per image side",
    "proposals.points_per_batch": "SAM prompts decoded per batch",
    "proposals.pred_iou_thresh": "keep masks whose predicted IoU exceeds this",
    "proposals.stability_score_thresh": "keep masks whose stability score exceeds this",
    "proposals.stability_score_offset": "logit offset of the stability score",
    "proposals.box_nms_thresh": "box IoU above which NMS drops the lower-scored mask",
    "proposals.max_proposals": "keep at most this many proposals (largest first)",
    "proposals.max_long_side": "downscale the image so its long side is at most this (pixels)",
    "proposals.implementation": "fast (ours) or reference (segment_anything's generator)",
    "proposals.decoder": "fast path's mask decoder: factored (fastest, same masks) or exact (bit-exact)",
    "selection.strategy": "top1_iou, iop_threshold, top1_iou_iop_threshold, topk_iou_iop_threshold",
    "selection.iop_threshold": "IoP threshold in [0, 1]",
    "selection.top_k": "k of the topk_iou_iop_threshold strategy",
    "lora.r": "LoRA rank (must match the trained adapter)",
    "lora.alpha": "LoRA alpha (must match the trained adapter)",
    "lora.dropout": "LoRA dropout (training only)",
    "lora.target_modules": "modules the LoRA adapter wraps (must match the trained adapter)",
    "conversation.max_turns": "earlier turns kept per conversation_id (older ones dropped; also dropped, oldest first, to fit the VLM's context)",
    "conversation.max_id_chars": "longest conversation_id accepted (characters)",
    "conversation.max_conversations": "conversations remembered at once (least recently used forgotten)",
}


def _config_parameter_name(path: tuple[str, ...]) -> str:
    if len(path) == 1 and path[0] in MODEL_FIELDS:
        return f"models.{path[0]}"
    return ".".join(path)


def _to_parameter(value: Any) -> ParameterValue:
    if value is None:
        return ""
    if isinstance(value, (tuple, list)):
        return [str(v) for v in value]
    if isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot express {type(value).__name__} {value!r} as a ROS parameter")


def config_to_parameters(config: SegmenterConfig) -> dict[str, ParameterValue]:
    """Every config field as a flat ROS parameter (``models.*``, ``proposals.*``, ...)."""
    out: dict[str, ParameterValue] = {}
    for fld in dataclasses.fields(config):
        if fld.name in SKIPPED_CONFIG_FIELDS:
            continue
        value = getattr(config, fld.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                out[_config_parameter_name((fld.name, sub.name))] = _to_parameter(getattr(value, sub.name))
        else:
            out[_config_parameter_name((fld.name,))] = _to_parameter(value)
    return out


def settings_to_parameters(settings: NodeSettings) -> dict[str, ParameterValue]:
    return {
        NODE_PARAMETERS[f.name]: _to_parameter(getattr(settings, f.name))
        for f in dataclasses.fields(settings)
    }


def default_parameters() -> dict[str, ParameterValue]:
    """Every parameter of the node with its default value (settings first, then the config's)."""
    return {**settings_to_parameters(NodeSettings()), **config_to_parameters(SegmenterConfig())}


def _from_parameter(name: str, value: Any, default: Any, optional: bool) -> Any:
    if optional and value == "":
        return None
    reference = default
    if reference is None:
        reference = ""
    if isinstance(reference, bool):
        if not isinstance(value, bool):
            raise ValueError(f"parameter {name} must be a bool, got {value!r}")
        return value
    if isinstance(reference, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"parameter {name} must be an integer, got {value!r}")
        return value
    if isinstance(reference, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"parameter {name} must be a number, got {value!r}")
        return float(value)
    if isinstance(reference, str):
        if not isinstance(value, str):
            raise ValueError(f"parameter {name} must be a string, got {value!r}")
        return value
    if isinstance(reference, (tuple, list)):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"parameter {name} must be a list of strings, got {value!r}")
        return tuple(value)
    raise TypeError(f"parameter {name}: unsupported default type {type(reference).__name__}")


def parameters_to_config(values: Mapping[str, Any], base: SegmenterConfig | None = None) -> SegmenterConfig:
    """The config described by flat parameters; names absent from ``values`` keep ``base``'s value.

    Raises:
        ValueError: a value of the wrong type, or one the config rejects (its message
            names the field).
    """
    base = base or SegmenterConfig()
    changes: dict[str, Any] = {}
    for fld in dataclasses.fields(base):
        if fld.name in SKIPPED_CONFIG_FIELDS:
            continue
        current = getattr(base, fld.name)
        if dataclasses.is_dataclass(current) and not isinstance(current, type):
            sub_changes: dict[str, Any] = {}
            for sub in dataclasses.fields(current):
                name = _config_parameter_name((fld.name, sub.name))
                if name in values:
                    optional = "None" in str(sub.type)
                    sub_changes[sub.name] = _from_parameter(
                        name, values[name], getattr(current, sub.name), optional
                    )
            if sub_changes:
                changes[fld.name] = dataclasses.replace(current, **sub_changes)
        else:
            name = _config_parameter_name((fld.name,))
            if name in values:
                changes[fld.name] = _from_parameter(name, values[name], current, "None" in str(fld.type))
    return dataclasses.replace(base, **changes) if changes else base


def parameters_to_settings(values: Mapping[str, Any]) -> NodeSettings:
    """The node settings described by flat parameters (absent names keep their defaults)."""
    defaults = NodeSettings()
    kwargs: dict[str, Any] = {}
    for fld in dataclasses.fields(defaults):
        name = NODE_PARAMETERS[fld.name]
        if name in values:
            kwargs[fld.name] = _from_parameter(name, values[name], getattr(defaults, fld.name), False)
    return NodeSettings(**kwargs)


def unknown_parameter_message(names: Iterable[str]) -> str:
    """Why parameters this node does not have are an error, with the nearest known names."""
    known = list(default_parameters())
    parts = []
    for name in sorted(names):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        parts.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return (
        f"unknown parameter(s) {', '.join(parts)}: this node has no such parameter, so the value would be "
        "ignored; fix or remove it in the parameters file or the command line "
        "(config/perception.yaml lists every parameter)"
    )


def split_parameters(values: Mapping[str, Any]) -> tuple[SegmenterConfig, NodeSettings]:
    """(config, settings) from every parameter of the node.

    Raises:
        ValueError: an unknown parameter name (a typo in the parameters file would
            otherwise be silently ignored) or an invalid value.
    """
    unknown = set(values) - set(default_parameters())
    if unknown:
        raise ValueError(unknown_parameter_message(unknown))
    return parameters_to_config(values), parameters_to_settings(values)


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list of strings"
    return type(value).__name__


@dataclass
class OverrideCheck:
    """What the node does with the parameter values given at start-up (parameters file, ``-p``).

    Attributes:
        coerced: name → value converted to the declared type (an integer given for a
            floating-point parameter, e.g. ``request_timeout: 30``).
        mistyped: name → message, for values whose type the parameter cannot take; the
            node keeps such a value (so ``configure`` reports it) instead of dying.
        unknown: names the node does not declare (typos), in the order given.
    """

    coerced: dict[str, ParameterValue] = dataclasses.field(default_factory=dict)
    mistyped: dict[str, str] = dataclasses.field(default_factory=dict)
    unknown: list[str] = dataclasses.field(default_factory=list)

    def problems(self) -> list[str]:
        """One message per problem, for the start-up log."""
        out = list(self.mistyped.values())
        if self.unknown:
            out.append(unknown_parameter_message(self.unknown))
        return out


def check_overrides(
    overrides: Mapping[str, Any], declared_elsewhere: Iterable[str] = (), node_name: str = "<node>"
) -> OverrideCheck:
    """Compare start-up parameter values with the types of the node's parameters.

    Args:
        overrides: parameter name → value given at start-up.
        declared_elsewhere: names declared by rclpy itself (``use_sim_time``, ...), which
            are not ours to check.
        node_name: fully qualified node name, for the messages.
    """
    defaults = default_parameters()
    skip = set(declared_elsewhere)
    check = OverrideCheck()
    for name, value in overrides.items():
        if name in skip:
            continue
        if name not in defaults:
            check.unknown.append(name)
            continue
        default = defaults[name]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            check.coerced[name] = float(value)
            continue
        same = type(value) is type(default) or (
            isinstance(default, list)
            and isinstance(value, (list, tuple))
            and all(isinstance(v, str) for v in value)
        )
        if not same:
            check.mistyped[name] = (
                f"parameter {name} is set to {value!r} ({_type_name(value)}) at start-up; expected "
                f"{_type_name(default)} like {_yaml_value(default)}. The node will not configure until it "
                f"is fixed in the parameters file or with: ros2 param set {node_name} {name} <value>"
            )
    return check


def handler_settings(
    config: SegmenterConfig, settings: NodeSettings, image_topic: str = "image"
) -> HandlerSettings:
    """The request handler's limits from the config and the node settings."""
    return HandlerSettings(
        max_instruction_chars=config.max_instruction_chars,
        request_timeout_s=settings.request_timeout,
        stamp_tolerance_s=settings.stamp_tolerance,
        image_topic=image_topic,
        max_conversations=config.conversation.max_conversations,
        max_conversation_id_chars=config.conversation.max_id_chars,
    )


def parameter_table_markdown() -> str:
    """A Markdown table of every parameter: name, default, description."""
    lines = ["| parameter | default | description |", "|---|---|---|"]
    for name, value in default_parameters().items():
        shown = f"`{value!r}`" if not isinstance(value, list) else f"`{value}`"
        lines.append(f"| `{name}` | {shown} | {DESCRIPTIONS.get(name, '')} |")
    return "\n".join(lines)


_YAML_HEADER = """\
# Parameters of the llmseg_ros perception node (llmseg_ros/node.py).
#
# Every parameter the node declares is listed here with its default value; ROS 2 flattens
# the nesting into dotted names (qos.image.reliability, models.sam_checkpoint, ...).
# - Keep the types: "" means "none"; an integer is accepted for a number (30 for 30.0).
#   A misspelled name or a value of the wrong type is reported when the node starts, and
#   the node then refuses to configure until it is fixed.
# - Parameters are read on the lifecycle 'configure' transition: after changing one, run
#   deactivate, cleanup, configure, activate (or restart the node).
# - perception.launch.py sets a parameter on the command line only when its launch
#   argument is given (e.g. device:=cuda); otherwise the value in this file applies.
# Generated by llmseg_ros.ros.params.parameters_yaml(); a test keeps it in sync.
/**:
  ros__parameters:
"""


def _yaml_value(value: ParameterValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def parameters_yaml() -> str:
    """``config/perception.yaml``: every parameter with its default and description, nested by prefix."""
    tree: dict[str, Any] = {}
    for name, value in default_parameters().items():
        *groups, key = name.split(".")
        node = tree
        for group in groups:
            node = node.setdefault(group, {})
        node[key] = (name, value)
    lines = [_YAML_HEADER.rstrip("\n")]

    def emit(node: dict[str, Any], indent: str) -> None:
        for key, item in node.items():
            if isinstance(item, dict):
                lines.extend(["", f"{indent}{key}:"] if indent == "    " else [f"{indent}{key}:"])
                emit(item, indent + "  ")
            else:
                name, value = item
                lines.extend(
                    [f"{indent}# {DESCRIPTIONS.get(name, '')}", f"{indent}{key}: {_yaml_value(value)}"]
                )

    # leaves first at the top level (the node's own parameters), then the groups
    emit({k: v for k, v in tree.items() if not isinstance(v, dict)}, "    ")
    emit({k: v for k, v in tree.items() if isinstance(v, dict)}, "    ")
    return "\n".join(lines) + "\n"
