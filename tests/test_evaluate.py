"""training/evaluate.py and llmseg_ros.evaluation.report on small fixtures with hand-computed metrics."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import pytest

from llmseg_ros.data import JsonlDataset, encode_rle, qa_pair, write_jsonl, write_llmseg40k
from llmseg_ros.data.synthetic import write_synthetic_dataset
from llmseg_ros.evaluation.metrics import IOU_EPS, reasonseg_metrics
from llmseg_ros.evaluation.report import WorstSamples, compare_methods, evaluate_samples, overlay

REPO = Path(__file__).resolve().parents[1]


def _load_script(path: Path) -> types.ModuleType:
    """Import a script from training/ by path (training/ is not a package)."""
    spec = importlib.util.spec_from_file_location("evaluate_script", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


evaluate = _load_script(REPO / "training" / "evaluate.py")

# Three samples whose sizes divide 1024, so the 1024 x 1024 counts are exact multiples:
#   a (4 x 8, phrase):   target rows 0-1 cols 0-2 (6 px), ignore rows 2-3 cols 4-5;
#                        prediction rows 0-1 cols 1-3 plus the ignore block → I = 4, U = 8
#   b (8 x 8, sentence): target = prediction = rows/cols 1-3 → I = U = 9
#   c (2 x 16, sentence): empty truth, 2 predicted px → I = 0, U = 2
# One normalised a/c pixel = 32768 px at 1024², one b pixel = 16384 px.
EXPECTED = {
    "overall": {
        "n": 3,
        "giou": (4 / (8 + IOU_EPS) + 9 / (9 + IOU_EPS) + 0.0) / 3,
        "ciou": 13 / 19,
        "nciou": (4 * 2 + 9) / (8 * 2 + 9 + 2 * 2),
    },
    "short": {"n": 1, "giou": 4 / (8 + IOU_EPS), "ciou": 0.5, "nciou": 0.5},
    "long": {"n": 2, "giou": 9 / (9 + IOU_EPS) / 2, "ciou": 9 / 11, "nciou": 9 / 13},
}


def _truths() -> dict[str, np.ndarray]:
    a = np.zeros((4, 8), np.uint8)
    a[0:2, 0:3] = 1
    a[2:4, 4:6] = 255
    b = np.zeros((8, 8), np.uint8)
    b[1:4, 1:4] = 1
    return {"img_a": a, "img_b": b, "img_c": np.zeros((2, 16), np.uint8)}


def _predictions() -> dict[str, np.ndarray]:
    a = np.zeros((4, 8), bool)
    a[0:2, 1:4] = True
    a[2:4, 4:6] = True
    b = np.zeros((8, 8), bool)
    b[1:4, 1:4] = True
    c = np.zeros((2, 16), bool)
    c[1, 7:9] = True
    return {"img_a": a, "img_b": b, "img_c": c}


def _write_image(path: Path, shape: tuple[int, int], value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((*shape, 3), value, np.uint8))


def _polygon(label: str, x0: int, y0: int, x1: int, y1: int) -> dict:
    return {"label": label, "points": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]}


@pytest.fixture
def fixture(tmp_path: Path) -> dict[str, Path]:
    truths = _truths()
    # ReasonSeg layout
    val = tmp_path / "ReasonSeg" / "val"
    annotations = {
        "img_a": {
            "text": ["the cup"],
            "is_sentence": False,
            "shapes": [_polygon("target", 0, 0, 2, 1), _polygon("ignore", 4, 2, 5, 3)],
        },
        "img_b": {
            "text": ["What holds my coffee?"],
            "is_sentence": True,
            "shapes": [_polygon("target", 1, 1, 3, 3)],
        },
        "img_c": {"text": ["Where is the dragon?"], "is_sentence": True, "shapes": []},
    }
    for name, annotation in annotations.items():
        _write_image(val / f"{name}.jpg", truths[name].shape, 120)
        (val / f"{name}.json").write_text(json.dumps(annotation), encoding="utf-8")
    # the same samples in the JSONL format (PNG mask with ignore, RLE masks)
    data = tmp_path / "jsonl"
    for name, truth in truths.items():
        _write_image(data / "images" / f"{name}.png", truth.shape, 120)
    assert cv2.imwrite(str(data / "mask_a.png"), truths["img_a"])
    write_jsonl(
        data / "val.jsonl",
        [
            {
                "id": "img_a",
                "image": "images/img_a.png",
                "question": "the cup",
                "mask": "mask_a.png",
                "is_sentence": False,
            },
            {
                "id": "img_b",
                "image": "images/img_b.png",
                "question": "What holds my coffee?",
                "rle": encode_rle(truths["img_b"]),
            },
            {
                "id": "img_c",
                "image": "images/img_c.png",
                "question": "Where is the dragon?",
                "rle": encode_rle(truths["img_c"]),
            },
        ],
    )
    preds = tmp_path / "preds"
    preds.mkdir()
    for name, pred in _predictions().items():
        assert cv2.imwrite(str(preds / f"{name}.png"), pred.astype(np.uint8) * 255)  # > 0 is foreground
    return {"reasonseg": tmp_path / "ReasonSeg", "jsonl": data / "val.jsonl", "preds": preds, "tmp": tmp_path}


def _check(summary: dict, expected: dict) -> None:
    assert summary["n"] == expected["n"]
    for key in ("giou", "ciou", "nciou"):
        assert summary[key] == pytest.approx(expected[key], rel=1e-9), key


def test_pred_dir_on_reasonseg_as_a_subprocess(fixture: dict[str, Path]) -> None:
    out = fixture["tmp"] / "report_rs"
    command = [
        sys.executable, str(REPO / "training" / "evaluate.py"), "--dataset", "reasonseg",
        "--root", str(fixture["reasonseg"]), "--split", "val", "--pred-dir", str(fixture["preds"]),
        "--out", str(out), "--overlays", "2",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=fixture["tmp"])
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["mode"] == "pred_dir" and report["dataset"] == "reasonseg"
    for subset in ("overall", "short", "long"):
        _check(report["splits"]["val"][subset], EXPECTED[subset])
        assert report["splits"]["val"][subset]["seconds_per_query"] is None  # no model ran
    assert [s["id"] for s in report["samples"]["val"]] == ["img_a", "img_b", "img_c"]
    assert [(s["intersection"], s["union"]) for s in report["samples"]["val"]] == [(4, 8), (9, 9), (0, 2)]
    # the two worst samples, worst first
    assert report["overlays"]["val"] == ["overlays/val_000_img_c.png", "overlays/val_001_img_a.png"]
    drawn = cv2.imread(str(out / "overlays" / "val_001_img_a.png"))
    assert drawn is not None and drawn.shape == (4, 8, 3)
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "| val / overall | 3 | 50.0 | 68.4 | 58.6 | – |" in markdown
    assert "| val / short | 1 | 50.0 | 50.0 | 50.0 | – |" in markdown
    assert "| val / long | 2 | 50.0 | 81.8 | 69.2 | – |" in markdown


def test_pred_dir_on_jsonl_as_a_function(
    fixture: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = fixture["tmp"] / "report_jsonl"
    argv = [
        "--dataset",
        "jsonl",
        "--root",
        str(fixture["jsonl"]),
        "--pred-dir",
        str(fixture["preds"]),
        "--out",
        str(out),
    ]
    assert evaluate.main(argv) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert set(report["splits"]["val"]) == {"overall"}  # short/long only for ReasonSeg
    _check(report["splits"]["val"]["overall"], EXPECTED["overall"])
    assert "report written to" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]  # no temporary files


def test_missing_and_misshapen_predictions(
    fixture: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (fixture["preds"] / "img_b.png").unlink()
    base = [
        "--dataset",
        "reasonseg",
        "--root",
        str(fixture["reasonseg"]),
        "--pred-dir",
        str(fixture["preds"]),
    ]
    assert evaluate.main([*base, "--out", str(fixture["tmp"] / "r1")]) == 1
    assert "1 of 3 predictions missing" in capsys.readouterr().err
    assert evaluate.main([*base, "--out", str(fixture["tmp"] / "r2"), "--allow-missing"]) == 0
    report = json.loads((fixture["tmp"] / "r2" / "report.json").read_text(encoding="utf-8"))
    assert report["missing_predictions"] == {"val": ["img_b"]}
    assert report["splits"]["val"]["overall"]["ciou"] == pytest.approx(4 / 19)  # b scored as empty: U = 9
    cv2.imwrite(str(fixture["preds"] / "img_b.png"), np.zeros((3, 3), np.uint8))
    assert evaluate.main([*base, "--out", str(fixture["tmp"] / "r3")]) == 1
    err = capsys.readouterr().err
    assert "sample 'img_b'" in err and "(3, 3)" in err and "(8, 8)" in err


def test_limit_and_usage_errors(fixture: dict[str, Path]) -> None:
    out = fixture["tmp"] / "limited"
    base = ["--dataset", "reasonseg", "--root", str(fixture["reasonseg"])]
    assert evaluate.main([*base, "--pred-dir", str(fixture["preds"]), "--out", str(out), "--limit", "1"]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["splits"]["val"]["overall"]["n"] == 1 and report["splits"]["val"]["long"] is None
    with pytest.raises(SystemExit) as no_source:
        evaluate.main(base)
    assert no_source.value.code == 2
    with pytest.raises(SystemExit):
        evaluate.main([*base, "--pred-dir", "x", "--profile", "tiny"])


class _FakeSegmenter:
    """Stands in for llmseg_ros.pipeline.ReasonSegmenter: predicts every pixel."""

    instances: ClassVar[list[_FakeSegmenter]] = []
    events: ClassVar[list[tuple[str, str]]] = []  # ("load" | "close", method) in order

    def __init__(self, config) -> None:
        self.config = config
        self.calls: list[tuple[str, Any, bool | None]] = []
        _FakeSegmenter.instances.append(self)
        _FakeSegmenter.events.append(("load", config.method))

    def segment(self, image, instruction, *, selection=None, is_sentence=None):
        self.calls.append((instruction, selection, is_sentence))
        return types.SimpleNamespace(mask=np.ones(image.shape[:2], bool))

    def close(self) -> None:
        _FakeSegmenter.events.append(("close", self.config.method))


@pytest.fixture
def fake_segmenter(monkeypatch: pytest.MonkeyPatch) -> type[_FakeSegmenter]:
    fake = types.ModuleType("llmseg_ros.pipeline")
    fake.ReasonSegmenter = _FakeSegmenter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "llmseg_ros.pipeline", fake)
    _FakeSegmenter.instances.clear()
    _FakeSegmenter.events.clear()
    return _FakeSegmenter


def test_model_mode_builds_the_segmenter_from_config_and_overrides(
    fixture: dict[str, Path], fake_segmenter: type[_FakeSegmenter]
) -> None:
    config_file = fixture["tmp"] / "config.json"
    config_file.write_text(json.dumps({"method": "llmseg", "device": "cpu"}), encoding="utf-8")
    out = fixture["tmp"] / "model_report"
    argv = [
        "--dataset", "reasonseg", "--root", str(fixture["reasonseg"]), "--config", str(config_file),
        "--weights", str(fixture["tmp"] / "w"), "--method", "lisa", "--strategy", "top1_iou", "--out", str(out),
    ]  # fmt: skip
    assert evaluate.main(argv) == 0
    (segmenter,) = _FakeSegmenter.instances
    assert segmenter.config.method == "lisa" and segmenter.config.selection.strategy == "top1_iou"
    assert segmenter.config.weights_dir == str(fixture["tmp"] / "w")
    assert len(segmenter.calls) == 1 + 3  # one untimed warm-up call, then every sample
    assert segmenter.calls[1][0] == "the cup" and segmenter.calls[1][1].strategy == "top1_iou"
    assert [c[2] for c in segmenter.calls[1:]] == [False, True, True]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["mode"] == "model" and report["config"]["method"] == "lisa"
    overall = report["splits"]["val"]["overall"]
    assert overall["seconds_per_query"] > 0
    truths = _truths()
    expected = reasonseg_metrics([np.ones(t.shape, bool) for t in truths.values()], list(truths.values()))
    assert overall["giou"] == pytest.approx(expected["giou"]) and overall["ciou"] == pytest.approx(15 / 124)


def test_evaluate_samples_and_compare_methods(fixture: dict[str, Path]) -> None:
    dataset = JsonlDataset(fixture["jsonl"])
    summary, records = evaluate_samples(dataset, lambda s: s.mask == 1, timed=False)
    assert summary["giou"] == pytest.approx(1.0, abs=1e-5) and summary["seconds_per_query"] is None
    assert [r.sample_id for r in records] == ["img_a", "img_b", "img_c"]
    summaries = compare_methods(
        dataset,
        {"oracle": lambda s: s.mask == 1, "empty": lambda s: np.zeros(s.mask.shape, bool)},
        out_dir=fixture["tmp"] / "cmp",
    )
    assert list(summaries) == ["oracle", "empty"]
    assert summaries["empty"]["giou"] == pytest.approx(1 / 3)  # only the empty-truth sample scores
    assert summaries["empty"]["ciou"] == 0.0 and summaries["oracle"]["ciou"] == 1.0
    assert summaries["oracle"]["seconds_per_query"] >= 0
    table = (fixture["tmp"] / "cmp" / "comparison.md").read_text(encoding="utf-8")
    assert "| oracle | 3 | 100.0 | 100.0 | 100.0 |" in table and "| empty | 3 | 33.3 | 0.0 | 0.0 |" in table
    stored = json.loads((fixture["tmp"] / "cmp" / "comparison.json").read_text(encoding="utf-8"))
    assert [s["id"] for s in stored["samples"]["empty"]] == ["img_a", "img_b", "img_c"]
    with pytest.raises(ValueError, match="no samples"):
        evaluate_samples([], lambda s: s.mask == 1)


def test_worst_samples_and_overlay_colours(fixture: dict[str, Path]) -> None:
    worst = WorstSamples(2)
    preds = _predictions()
    evaluate_samples(JsonlDataset(fixture["jsonl"]), lambda s: preds[s.image_id], callback=worst)
    assert [r.sample_id for r, _ in worst.worst()] == ["img_c", "img_a"]
    image = np.zeros((1, 4, 3), np.uint8)
    pred = np.array([[True, True, False, False]])
    truth = np.array([[1, 0, 1, 255]], np.uint8)
    colours = overlay(image, pred, truth, alpha=1.0)[0].tolist()
    assert colours == [[0, 200, 0], [230, 0, 0], [0, 80, 255], [128, 128, 128]]


def test_several_splits_use_per_split_prediction_folders(fixture: dict[str, Path]) -> None:
    root = fixture["reasonseg"]
    shutil.copytree(root / "val", root / "test")
    preds = fixture["preds"]
    for split in ("val", "test"):
        (preds / split).mkdir()
        for png in preds.glob("*.png"):
            shutil.copy(png, preds / split / png.name)
    (preds / "test" / "img_c.png").unlink()  # the test folder is the one read for the test split
    out = fixture["tmp"] / "two_splits"
    argv = ["--dataset", "reasonseg", "--root", str(root), "--split", "val,test", "--pred-dir", str(preds)]
    assert evaluate.main([*argv, "--out", str(out), "--allow-missing"]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert list(report["splits"]) == ["val", "test"]
    assert report["missing_predictions"] == {"val": [], "test": ["img_c"]}
    _check(report["splits"]["val"]["overall"], EXPECTED["overall"])
    assert report["splits"]["test"]["overall"]["giou"] == pytest.approx(
        (4 / (8 + IOU_EPS) + 9 / (9 + IOU_EPS) + 1) / 3
    )


def test_llmseg40k_through_the_command_line(fixture: dict[str, Path]) -> None:
    truths = _truths()
    images = fixture["tmp"] / "coco"
    for name, truth in truths.items():
        _write_image(images / f"{name}.jpg", truth.shape, 90)
    records = {
        f"{name}.jpg": {"from_dataset": "coco", "qa_pairs": [qa_pair("Which one?", "x", mask=truth == 1)]}
        for name, truth in truths.items()
    }
    write_llmseg40k(fixture["tmp"] / "ann" / "llmseg40k_val.json", records)
    preds = fixture["tmp"] / "preds40k"
    preds.mkdir()
    for name, pred in _predictions().items():
        cv2.imwrite(str(preds / f"{name}_0.png"), pred.astype(np.uint8))
    out = fixture["tmp"] / "r40k"
    argv = [
        "--dataset", "llmseg40k", "--root", str(fixture["tmp"] / "ann"), "--image-root", f"coco={images}",
        "--pred-dir", str(preds), "--out", str(out),
    ]  # fmt: skip
    assert evaluate.main(argv) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [s["id"] for s in report["samples"]["val"]] == ["img_a_0", "img_b_0", "img_c_0"]
    # RLE truths carry no ignore label: the ignore block of a now counts as a false positive
    expected = reasonseg_metrics(
        list(_predictions().values()), [(t == 1).astype(np.uint8) for t in truths.values()]
    )
    _check(report["splits"]["val"]["overall"], {"n": 3, **expected})
    assert report["samples"]["val"][0]["union"] == 12


@pytest.mark.slow
def test_tiny_profile_end_to_end_on_synthetic_scenes(tmp_path: Path) -> None:
    """The real model path: tiny random models of every component, built and loaded from disk."""
    write_synthetic_dataset(tmp_path / "synthetic", {"val": 2}, seed=3)
    out = tmp_path / "report"
    argv = [
        "--dataset", "jsonl", "--root", str(tmp_path / "synthetic" / "jsonl"), "--profile", "tiny",
        "--profile-dir", str(tmp_path / "tiny"), "--strategy", "top1_iou", "--out", str(out), "--overlays", "1",
    ]  # fmt: skip
    assert evaluate.main(argv) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    overall = report["splits"]["val"]["overall"]
    assert overall["n"] == 2 and overall["seconds_per_query"] > 0
    assert all(0.0 <= overall[k] <= 1.0 for k in ("giou", "ciou", "nciou"))
    assert report["config"]["method"] == "llmseg" and report["config"]["selection"]["strategy"] == "top1_iou"
    assert len(report["overlays"]["val"]) == 1 and (out / report["overlays"]["val"][0]).is_file()


# -- --compare --------------------------------------------------------------------------


def test_compare_rows_configs_layout_and_model_lifetimes(
    fixture: dict[str, Path], fake_segmenter: type[_FakeSegmenter], capsys: pytest.CaptureFixture[str]
) -> None:
    """Two rows over two splits: one load per row, closed before the next; overrides as documented."""
    root = fixture["reasonseg"]
    shutil.copytree(root / "val", root / "test")
    base_file, row_file = fixture["tmp"] / "base.json", fixture["tmp"] / "row.yaml"
    base_file.write_text(json.dumps({"method": "grounded", "device": "auto"}), encoding="utf-8")
    row_file.write_text("method: lisa\nweights_dir: lisa_weights\ndevice: cuda:1\n", encoding="utf-8")
    out = fixture["tmp"] / "cmp"
    argv = [
        "--dataset", "reasonseg", "--root", str(root), "--split", "val,test", "--config", str(base_file),
        "--weights", "w", "--strategy", "top1_iou", "--device", "cpu", "--overlays", "1", "--out", str(out),
        "--compare", "llmseg", "--compare", f"mine={row_file}",
    ]  # fmt: skip
    assert evaluate.main(argv) == 0
    assert fake_segmenter.events == [
        ("load", "llmseg"),
        ("close", "llmseg"),
        ("load", "lisa"),
        ("close", "lisa"),
    ]
    named, configured = fake_segmenter.instances
    # NAME row: base config, method NAME, --weights / --strategy / --device applied
    assert named.config.weights_dir == "w" and named.config.selection.strategy == "top1_iou"
    assert named.config.device == "cpu" and all(c[1].strategy == "top1_iou" for c in named.calls)
    # NAME=CONFIG row: the file as written, only --device applied
    assert configured.config.weights_dir == "lisa_weights" and configured.config.device == "cpu"
    assert configured.config.selection.strategy != "top1_iou" and all(c[1] is None for c in configured.calls)
    for segmenter in (named, configured):
        assert len(segmenter.calls) == 1 + 3 + 3  # one warm-up call, then both splits
    printed = capsys.readouterr().out
    truths = list(_truths().values())
    expected = reasonseg_metrics([np.ones(t.shape, bool) for t in truths], truths)
    for split in ("val", "test"):
        assert sorted(p.name for p in (out / split).iterdir()) == [
            "comparison.json",
            "comparison.md",
            "overlays",
        ]
        comparison = json.loads((out / split / "comparison.json").read_text(encoding="utf-8"))
        assert comparison["rows"] == ["llmseg", "mine"] and comparison["pending"] == []
        assert comparison["configs"]["mine"]["method"] == "lisa"
        for name in ("llmseg", "mine"):
            _check(comparison["methods"][name], {"n": 3, **expected})
            assert comparison["methods"][name]["seconds_per_query"] > 0
            assert comparison["breakdown"][name]["short"]["n"] == 1  # ReasonSeg query types
            assert [s["id"] for s in comparison["samples"][name]] == ["img_a", "img_b", "img_c"]
        assert comparison["overlays"] == {
            "llmseg": ["overlays/llmseg_000_img_c.png"],
            "mine": ["overlays/mine_000_img_c.png"],
        }
        assert (out / split / "overlays" / "mine_000_img_c.png").is_file()
        table = (out / split / "comparison.md").read_text(encoding="utf-8")
        assert table in printed
        row = f"| 3 | {100 * expected['giou']:.1f} | {100 * expected['ciou']:.1f} | {100 * expected['nciou']:.1f} |"
        assert f"| llmseg {row}" in table and f"| mine {row}" in table
        assert "- mine: method `lisa`, weights `lisa_weights`, device `cpu`" in table
        assert "| mine / long | 2 |" in table
    assert not (out / "report.json").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--profile", "tiny", "--compare", "llmseg", "--compare", "sam3"], "unknown method 'sam3'"),
        (["--compare", "x={missing}"], "cannot use config file {missing}"),
        (["--compare", "x={bad_yaml}"], "cannot use config file {bad_yaml}"),
        (["--compare", "x={unknown_field}"], "unknown config field(s) ['weights']"),
        (["--compare", "x="], "expected NAME=CONFIG"),
        (["--compare", "={good}"], "non-empty label"),
        (["--compare", "a|b={good}"], "got 'a|b'"),
        (["--profile", "tiny", "--compare", "lisa", "--compare", "lisa={good}"], "more than once: ['lisa']"),
        (["--compare", "lisa", "--pred-dir", "preds"], "cannot be combined with --pred-dir"),
        (["--profile", "tiny", "--compare", "lisa", "--method", "llmseg"], "with --compare each row names"),
        (["--compare", "x={good}", "--compare", "lisa"], "--compare lisa has no =CONFIG"),
    ],
)
def test_compare_usage_errors(
    fixture: dict[str, Path], capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    files = {
        "missing": fixture["tmp"] / "missing.yaml",
        "bad_yaml": fixture["tmp"] / "bad.yaml",
        "unknown_field": fixture["tmp"] / "unknown.json",
        "good": fixture["tmp"] / "good.json",
    }
    files["bad_yaml"].write_text("method: [lisa\n", encoding="utf-8")
    files["unknown_field"].write_text(json.dumps({"method": "lisa", "weights": "w"}), encoding="utf-8")
    files["good"].write_text(json.dumps({"method": "lisa", "weights_dir": "w"}), encoding="utf-8")
    names = {key: str(path) for key, path in files.items()}
    argv = ["--dataset", "reasonseg", "--root", str(fixture["reasonseg"])]
    with pytest.raises(SystemExit) as exited:
        evaluate.main([*argv, *(item.format(**names) for item in extra)])
    assert exited.value.code == 2
    assert message.format(**names) in capsys.readouterr().err


def _scenes_jsonl(directory: Path) -> Path:
    """Two non-square scenes (the tiny Grounding DINO fails on square inputs: its last
    feature map shrinks to 1 x 1), target = the green box, one sentence and one phrase."""
    records = []
    for index, (h, w) in enumerate([(96, 128), (80, 144)]):
        image = np.zeros((h, w, 3), np.uint8)
        image[:] = np.linspace(40, 200, w, dtype=np.uint8)[None, :, None]
        cv2.circle(image, (30, 40), 15, (30, 30, 220), -1)  # BGR: a red disc
        cv2.rectangle(image, (60, 20), (100, 60), (40, 200, 30), -1)  # a green box
        (directory / "images").mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(directory / "images" / f"scene{index}.png"), image)
        mask = np.zeros((h, w), np.uint8)
        mask[20:61, 60:101] = 1
        question = "Where could I put my cup down?" if index == 0 else "the green box"
        records.append(
            {
                "id": f"scene{index}",
                "image": f"images/scene{index}.png",
                "question": question,
                "rle": encode_rle(mask),
                "is_sentence": index == 0,
            }
        )
    write_jsonl(directory / "val.jsonl", records)
    return directory / "val.jsonl"


@pytest.mark.slow
def test_compare_llmseg_lisa_grounded_equals_single_runs(
    tmp_path: Path,
    tiny_profile_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The real tiny models: each comparison row scores exactly like a single-method run."""
    from llmseg_ros.pipeline import ReasonSegmenter

    events: list[tuple[str, str]] = []
    init, close = ReasonSegmenter.__init__, ReasonSegmenter.close

    def logged_init(self: ReasonSegmenter, config: Any, **kwargs: Any) -> None:
        events.append(("load", config.method))
        init(self, config, **kwargs)

    def logged_close(self: ReasonSegmenter) -> None:
        events.append(("close", self.config.method))
        close(self)

    monkeypatch.setattr(ReasonSegmenter, "__init__", logged_init)
    monkeypatch.setattr(ReasonSegmenter, "close", logged_close)
    base = [
        "--dataset", "jsonl", "--root", str(_scenes_jsonl(tmp_path / "scenes")), "--profile", "tiny",
        "--profile-dir", str(tiny_profile_dir), "--strategy", "top1_iou",
    ]  # fmt: skip
    methods = ["llmseg", "lisa", "grounded"]
    out = tmp_path / "cmp"
    assert evaluate.main([*base, "--out", str(out), *(a for m in methods for a in ("--compare", m))]) == 0
    assert events == [(kind, m) for m in methods for kind in ("load", "close")]
    comparison = json.loads((out / "val" / "comparison.json").read_text(encoding="utf-8"))
    table = (out / "val" / "comparison.md").read_text(encoding="utf-8")
    assert table in capsys.readouterr().out
    assert list(comparison["methods"]) == methods
    for method in methods:
        single = tmp_path / f"single_{method}"
        assert evaluate.main([*base, "--method", method, "--warmup", "0", "--out", str(single)]) == 0
        report = json.loads((single / "report.json").read_text(encoding="utf-8"))
        row, overall = comparison["methods"][method], report["splits"]["val"]["overall"]
        assert comparison["configs"][method] == report["config"]
        assert [row[k] for k in ("n", "giou", "ciou", "nciou")] == [
            overall[k] for k in ("n", "giou", "ciou", "nciou")
        ]
        assert [s["iou"] for s in comparison["samples"][method]] == [
            s["iou"] for s in report["samples"]["val"]
        ]
        assert f"| {method} | 2 | {100 * row['giou']:.1f} | {100 * row['ciou']:.1f} |" in table
    assert len({comparison["methods"][m]["ciou"] for m in methods}) == 3  # three different models
