"""Configuration files: every error names the file, the line and what was expected.

One loader (``llmseg_ros.utils.configfile``) reads the segmenter config (``llmseg --config``),
the training config and the bag-replay instructions file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmseg_ros import cli
from llmseg_ros.config import SegmenterConfig
from llmseg_ros.ros.schedule import ReplaySchedule
from llmseg_ros.training.config import TrainConfig, read_mapping

DEMO = Path(__file__).resolve().parents[1] / "llmseg_ros" / "assets" / "kitchen.jpg"

# (file name, content, the location and the expectation the message must give)
BROKEN = [
    pytest.param(
        "flow.yaml",
        "method: llmseg\nproposals:\n  points_per_side: [16\nvlm: x\n",
        r"flow\.yaml, line 4, column \d+: expected ',' or '\]'",
        id="yaml-unclosed-list",
    ),
    pytest.param(
        "indent.yaml",
        "method: llmseg\n  vlm: x\n",
        r"indent\.yaml, line 2, column \d+: mapping values are not allowed here",
        id="yaml-bad-indent",
    ),
    pytest.param(
        "value.json",
        '{"method": "llmseg",\n "vlm": }\n',
        r"value\.json, line 2, column 9: expected value \(read as JSON",
        id="json-missing-value",
    ),
    pytest.param(
        "yaml_in.json",
        "method: llmseg\n",
        r"yaml_in\.json, line 1, column 1: expected value \(read as JSON: the name ends in \.json\)",
        id="yaml-named-json",
    ),
    pytest.param(
        "list.yaml",
        "- method: llmseg\n",
        r"list\.yaml, line 1: must hold a mapping of field names to values, got a list",
        id="not-a-mapping",
    ),
    pytest.param(
        "empty.yaml",
        "",
        r"empty\.yaml, line 1: must hold a mapping .*got nothing \(the file is empty\)",
        id="empty",
    ),
]


@pytest.mark.parametrize(("name", "text", "message"), BROKEN)
def test_unparsable_files_name_file_line_and_expectation(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    for load in (SegmenterConfig.from_file, TrainConfig.from_file, read_mapping):
        with pytest.raises(ValueError, match=message):
            load(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("method: llmseg\n\nmethod_x: 1\n", r"line 3: unknown config field\(s\) \['method_x'\]"),
        ("vlm: v\nmethod: magic\n", r"line 2: method must be one of \[.*\], got 'magic'"),
        (
            "proposals:\n  max_long_side: 64\n  points_per_side: 0\n",
            "line 3: points_per_side must be >= 1, got 0",
        ),
        ("lora:\n  r: 0\n", r"line 2: r must be >= 1"),
        (
            "selection:\n  strategy: top1_iou\n  bogus: 2\n",
            r"line 3: unknown selection field\(s\) \['bogus'\]",
        ),
    ],
)
def test_invalid_fields_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "segmenter.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"config file {path}, {message}"):
        SegmenterConfig.from_file(path)


def test_json_key_lines_survive_tab_indentation(tmp_path: Path) -> None:
    path = tmp_path / "tabs.json"
    path.write_text('{\n\t"method": "llmseg",\n\t"proposals": {\n\t\t"points_per_side": 0\n\t}\n}\n')
    with pytest.raises(ValueError, match=r"tabs\.json, line 4: points_per_side must be >= 1"):
        SegmenterConfig.from_file(path)


def test_training_config_field_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("profile: tiny\nmax_steps: 2\nlr_typo: 1.0e-4\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"config file {path}, line 3: unknown training config field"):
        TrainConfig.from_file(path)


def test_instructions_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text("instruction: a cup\nevery_n: 2\nat:\n  - {stamp: 1.0}\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"plan\.yaml, line 4: at\[0\]\.instruction must be a non-empty string"
    ):
        ReplaySchedule.from_file(path)
    path.write_text("instruction: [a cup\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"cannot parse the instructions file .*plan\.yaml, line 2"):
        ReplaySchedule.from_file(path)


def test_valid_files_still_load(tmp_path: Path) -> None:
    config = SegmenterConfig(method="lisa", sam_checkpoint="sam.pth")
    other = tmp_path / "segmenter.cfg"  # neither .json nor .yaml: read as YAML, which reads JSON too
    other.write_text(json.dumps(config.to_dict()), encoding="utf-8")
    assert SegmenterConfig.from_file(other) == config


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.yaml", "method: llmseg\nvlm: [unclosed\n", r"bad\.yaml, line 3, column 1: expected"),
        ("bad.json", "not json", r"bad\.json, line 1, column 1: expected value"),
        ("bad_value.yaml", "device: tpu\n", r"bad_value\.yaml, line 1: device must be"),
    ],
)
def test_cli_config_errors_exit_2_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    args = ["segment", "--config", str(path), "--image", str(DEMO), "--instruction", "x"]
    code = cli.main([*args, "--out", str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert err.startswith("error: ") and "Traceback" not in err
    assert str(tmp_path) in err
    assert any(re.search(message, line) for line in err.splitlines()), err


def test_training_scripts_report_config_errors_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    scripts = Path(__file__).resolve().parents[1] / "training"
    bad = tmp_path / "train.yaml"
    bad.write_text("profile: tiny\nlora: {r: 8\n", encoding="utf-8")
    for name, argv in (("train", ["--config", str(bad)]), ("precompute", ["--proposal-config", str(bad)])):
        spec = importlib.util.spec_from_file_location(f"script_{name}", scripts / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if name == "precompute":
            argv += ["--out", str(tmp_path / "cache"), "--images", str(DEMO)]
        try:
            code = module.main(argv)
        except SystemExit as exit_:
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2, name
        assert f"cannot parse config file {bad}, line 3, column 1: expected ',' or '}}'" in err, err
