"""training/evaluate.py in 2 CPU processes (torchrun, gloo): the same report files as one
process — metrics, query-type breakdown, comparison tables and worst-sample overlays — and
a bad prediction in one process's block stops both with the same clear error."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from evaluate_testing import load_evaluate_script, rule_pipeline, write_fixture
from precompute_testing import torchrun, tree_bytes

from llmseg_ros.data.reasonseg import ReasonSegDataset
from llmseg_ros.evaluation.report import evaluate_samples
from llmseg_ros.evaluation.runner import evaluate_split

WORKER = Path(__file__).resolve().parent / "evaluate_worker.py"
TIMINGS = ("seconds", "seconds_per_query")


def untimed(value: Any) -> Any:
    """A report without what differs between any two runs: timings and the creation time."""
    if isinstance(value, dict):
        return {
            key: None if key in TIMINGS else untimed(item) for key, item in value.items() if key != "created"
        }
    if isinstance(value, list):
        return [untimed(item) for item in value]
    return value


def untimed_markdown(text: str) -> str:
    """A Markdown table without its seconds-per-query column (the last one)."""
    return re.sub(r"\| [0-9.]+ \|$", "| s |", text, flags=re.MULTILINE)


def same_outputs(one: Path, two: Path) -> None:
    expected, got = tree_bytes(one), tree_bytes(two)
    assert sorted(got) == sorted(expected)
    for name, data in expected.items():
        if name.endswith(".json"):
            assert untimed(json.loads(got[name])) == untimed(json.loads(data)), name
        elif name.endswith(".md"):
            assert untimed_markdown(got[name].decode()) == untimed_markdown(data.decode()), name
        else:  # overlay PNGs
            assert got[name] == data, name


def test_two_processes_write_the_reports_of_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fixture = write_fixture(tmp_path)
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"method": "llmseg", "device": "cpu"}), encoding="utf-8")
    dataset = [
        "--dataset",
        "reasonseg",
        "--root",
        str(fixture["root"]),
        "--split",
        "val,test",
        "--overlays",
        "2",
    ]
    runs = {
        "saved": [*dataset, "--pred-dir", str(fixture["preds"])],
        "model": [*dataset, "--config", str(base), "--strategy", "top1_iou"],
        "compare": [*dataset, "--config", str(base), "--compare", "llmseg", "--compare", "lisa"],
    }
    bad = tmp_path / "bad_preds"
    shutil.copytree(fixture["preds"], bad)
    last = ReasonSegDataset(fixture["root"], "val").sample_ids[-1]  # in rank 1's block
    assert cv2.imwrite(str(bad / "val" / f"{last}.png"), np.zeros((3, 3), np.uint8))
    failing = [*dataset, "--pred-dir", str(bad), "--out", str(tmp_path / "never")]

    job = torchrun(
        WORKER,
        [
            json.dumps(
                [*[[*argv, "--out", str(tmp_path / "two" / name)] for name, argv in runs.items()], failing]
            )
        ],
        cwd=tmp_path,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} statuses [0, 0, 0, 1]" in job.stdout
    assert job.stdout.count("# Evaluation report") == 2  # rank 0 prints its two reports
    assert job.stderr.count(f"rank 1: ValueError: sample '{last}'") == 2  # both ranks stop, same message
    assert not (tmp_path / "never").exists()

    monkeypatch.setitem(sys.modules, "llmseg_ros.pipeline", rule_pipeline())
    evaluate = load_evaluate_script()
    for name, argv in runs.items():
        assert evaluate.main([*argv, "--out", str(tmp_path / "one" / name)]) == 0
    for name in runs:
        same_outputs(tmp_path / "one" / name, tmp_path / "two" / name)
    saved = json.loads((tmp_path / "one" / "saved" / "report.json").read_text(encoding="utf-8"))
    ids = ReasonSegDataset(fixture["root"], "val").sample_ids
    # three val samples at IoU 0: the overlays keep the first two, as one process does
    assert [s["iou"] for s in saved["samples"]["val"]][1::2] == [0.0, 0.0]
    assert saved["overlays"]["val"] == [f"overlays/val_000_{ids[1]}.png", f"overlays/val_001_{ids[3]}.png"]
    assert set(saved["splits"]["val"]) == {"overall", "short", "long"}


def test_evaluate_split_is_the_entry_point_for_a_predictor_on_a_split(tmp_path: Path) -> None:
    fixture = write_fixture(tmp_path)
    dataset = ReasonSegDataset(fixture["root"], "val")
    preds = {
        s.image_id: cv2.imread(str(fixture["preds"] / "val" / f"{s.image_id}.png"), 0) > 0 for s in dataset
    }

    def predict(sample):
        return preds[sample.image_id]

    result = evaluate_split(dataset, predict, limit=4, timed=False, overlays=2)
    summary, records = evaluate_samples([dataset[i] for i in range(4)], predict, timed=False)
    assert result.summary == summary and result.records == records
    assert [r.sample_id for r, _ in result.worst] == [dataset.sample_ids[1], dataset.sample_ids[3]]
    assert result.worst[0][1].shape == (*dataset[1].mask.shape, 3)
    assert result.breakdown()["overall"] == summary
    with pytest.raises(ValueError, match="limit must be >= 1"):
        evaluate_split(dataset, predict, limit=0)
    with pytest.raises(ValueError, match="no samples"):
        evaluate_split([], predict)
