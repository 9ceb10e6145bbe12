"""Training's durable writes (issue 15): checkpoints, the weights export and the run logs.

* checkpoints load without unpickling arbitrary objects (safetensors, JSON, and
  ``torch.load(weights_only=True)`` for optimizer / scheduler / RNG states), and a planted
  pickle never runs;
* a damaged newest checkpoint falls back to the previous one with a warning;
* a failure injected at every write step of a checkpoint or a weights export leaves the
  previous complete version (or the new complete one), never a half-written one;
* ``metrics.jsonl`` cut at any byte of its last line (a crash mid-append) is read back
  without that line;
* a training process killed with SIGKILL resumes to the identical result.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from training_setup import build_setup, make_config

from llmseg_ros.training.checkpoint import (
    TrainState,
    checkpoint_name,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)


def find_checkpoint(root: Path) -> tuple[Any, list[str]]:
    from llmseg_ros.training.checkpoint import find_checkpoint as find

    return find(root)


REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this object creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return os.mkdir, (str(self.marker),)


def _toy_run(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer, Any]:
    """A few AdamW steps on small tensors, with a warm-up/decay LambdaLR, as the trainer builds them."""
    torch.manual_seed(seed)
    params = {"a.weight": torch.nn.Parameter(torch.randn(4, 3)), "b.bias": torch.nn.Parameter(torch.randn(5))}
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-2, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 2))
    for _ in range(3):
        loss = sum((p**2).sum() for p in params.values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return dict(params), optimizer, scheduler


def _save(root: Path, step: int, seed: int = 0) -> Path:
    params, optimizer, scheduler = _toy_run(seed)
    return save_checkpoint(
        root,
        TrainState(step=step, micro_step=2 * step, fingerprint="f"),
        trainable={k: v.detach() for k, v in params.items()},
        optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict(),
        keep=2,
    )


def test_checkpoint_state_round_trips_under_weights_only(tmp_path: Path) -> None:
    params, optimizer, scheduler = _toy_run()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    path = save_checkpoint(
        tmp_path,
        TrainState(step=3, micro_step=6, fingerprint="f", best_score=0.25, best_step=2),
        trainable={k: v.detach() for k, v in params.items()},
        optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict(),
    )
    expected = (random.random(), np.random.normal(), torch.rand(2))
    assert sorted(p.name for p in path.iterdir()) == [
        "optimizer.pt",
        "rng_0.pt",
        "scheduler.pt",
        "state.json",
        "trainable.safetensors",
    ]
    for name in ("optimizer.pt", "scheduler.pt", "rng_0.pt"):
        torch.load(path / name, weights_only=True)  # plain data and tensors only
    loaded = load_checkpoint(path)
    assert loaded.state == TrainState(step=3, micro_step=6, fingerprint="f", best_score=0.25, best_step=2)
    assert all(torch.equal(loaded.trainable[k], v) for k, v in params.items())
    reference = optimizer.state_dict()
    assert loaded.optimizer_state is not None
    assert loaded.optimizer_state["param_groups"] == reference["param_groups"]
    for index, state in reference["state"].items():
        for key, value in state.items():
            assert torch.equal(loaded.optimizer_state["state"][index][key], value)
    assert loaded.scheduler_state == scheduler.state_dict()
    # a fresh optimizer takes the state and steps exactly like the original
    fresh = {k: torch.nn.Parameter(v.clone()) for k, v in loaded.trainable.items()}
    twin = torch.optim.AdamW(list(fresh.values()), lr=1e-2, betas=(0.9, 0.95))
    twin.load_state_dict(loaded.optimizer_state)
    for group in (optimizer, twin):
        ps = params if group is optimizer else fresh
        sum((p**3).sum() for p in ps.values()).backward()
        group.step()
    assert all(torch.equal(params[k], fresh[k]) for k in params)
    assert loaded.rng is not None
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(loaded.rng)
    again = (random.random(), np.random.normal(), torch.rand(2))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])
    assert rng_state()["numpy"][0] == "MT19937"


def test_a_planted_pickle_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    # an old-style checkpoint whose every file is a pickle that would run code
    planted = tmp_path / "checkpoints" / checkpoint_name(2)
    planted.mkdir(parents=True)
    (planted / "state.json").write_text(
        json.dumps({"step": 2, "micro_step": 4, "world_size": 1, "fingerprint": "f"})
    )
    for name in ("trainable.pt", "optimizer.pt", "scheduler.pt", "rng_0.pt"):
        torch.save(Payload(marker), planted / name)
    with pytest.raises(ValueError, match=r"checkpoint format .* never loaded"):
        load_checkpoint(planted)
    found, problems = find_checkpoint(tmp_path / "checkpoints")
    assert found is None and len(problems) == 1
    assert not marker.exists()

    # a genuine checkpoint with a planted extra file, or a swapped file with forged digests
    good = _save(tmp_path / "good", 4)
    torch.save(Payload(marker), good / "trainable.pt")
    with pytest.raises(ValueError, match=r"files its state.json does not list: \['trainable.pt'\]"):
        load_checkpoint(good)
    (good / "trainable.pt").unlink()
    torch.save(Payload(marker), good / "optimizer.pt")
    with pytest.raises(ValueError, match=r"optimizer.pt has .* bytes|optimizer.pt does not match"):
        load_checkpoint(good)
    import hashlib

    record = json.loads((good / "state.json").read_text())
    data = (good / "optimizer.pt").read_bytes()
    record["files"]["optimizer.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (good / "state.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"optimizer.pt could not be read .*weights_only=True"):
        load_checkpoint(good)
    assert not marker.exists()


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    older, newer = _save(tmp_path, 2, seed=0), _save(tmp_path, 4, seed=1)
    with open(newer / "trainable.safetensors", "r+b") as fh:
        fh.truncate(os.path.getsize(newer / "trainable.safetensors") // 2)
    found, problems = find_checkpoint(tmp_path)
    assert found is not None and found.path == older and found.state.step == 2
    assert len(problems) == 1 and "trainable.safetensors has" in problems[0] and "truncated" in problems[0]
    (newer / "state.json").write_text('{"format": 2, "step": 4')  # torn state file
    found, problems = find_checkpoint(tmp_path)
    assert found is not None and found.path == older and "not readable JSON" in problems[0]


# -- fault injection ---------------------------------------------------------------------


class Injected(OSError):
    pass


class Injection:
    """What :func:`fail_at` did: the calls seen and whether the failure was raised."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.raised = False
        self.failed_call = ""


@contextmanager
def fail_at(call: int, targets: list[tuple[Any, str]]) -> Iterator[Injection]:
    """Make the ``call``-th call (1-based) to any of ``targets`` fail.

    A failing file write first writes half of its output (a process killed mid-write);
    every other operation fails before it acts.
    """
    injection = Injection()
    originals = [(owner, name, getattr(owner, name)) for owner, name in targets]

    def wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            injection.calls.append(name)
            if len(injection.calls) != call:
                return original(*args, **kwargs)
            injection.raised, injection.failed_call = True, name
            if name in ("save", "save_file"):
                original(*args, **kwargs)
                target = Path(args[1])
                with open(target, "r+b") as fh:
                    fh.truncate(os.path.getsize(target) // 2)
                raise Injected(f"injected failure in {name} (file half written)")
            raise Injected(f"injected failure before {name}")

        return wrapper

    for owner, name, original in originals:
        setattr(owner, name, wrap(name, original))
    try:
        yield injection
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def _write_targets() -> list[tuple[Any, str]]:
    import safetensors.torch

    return [
        (torch, "save"),
        (safetensors.torch, "save_file"),
        (os, "replace"),
        (os, "fsync"),
        (os, "rename"),
        (os, "chmod"),
        (shutil, "rmtree"),
        (json, "dump"),
    ]


def _state_of(path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    loaded = load_checkpoint(path)
    return loaded.state.step, loaded.trainable


def test_a_checkpoint_write_failing_at_any_step_leaves_a_complete_one(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _save(root, 2, seed=0)
    reference = _state_of(_save(tmp_path / "reference", 4, seed=1))[1]
    call = 1
    while True:
        work = tmp_path / f"try{call}"
        shutil.copytree(root, work)
        with fail_at(call, _write_targets()) as injection:
            try:
                _save(work, 4, seed=1)
                failed = False
            except Injected:
                failed = True
        found, problems = find_checkpoint(work)
        where = f"failure at call {call} ({injection.failed_call})"
        assert found is not None, f"{where}: nothing loads ({problems})"
        if found.state.step == 4:  # only once complete
            assert all(torch.equal(found.trainable[k], v) for k, v in reference.items()), where
        else:
            assert found.state.step == 2 and failed, where
        _save(work, 4, seed=1)  # the next run writes it again
        step, trainable = _state_of(work / checkpoint_name(4))
        assert step == 4 and all(torch.equal(trainable[k], v) for k, v in reference.items())
        if not injection.raised:  # past the last write step
            break
        call += 1
    assert call > 12  # files, their fsyncs, the state file, the rename


class _Adapter:
    """Stands for the VLM: writes an adapter folder like SegVLM.save_adapter."""

    def __init__(self, value: float) -> None:
        self.value = value

    def save_adapter(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True)
        save_file({"w": torch.full((3,), self.value)}, str(directory / "adapter_model.safetensors"))
        (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))


def test_a_weights_export_failing_at_any_step_leaves_a_complete_one(tmp_path: Path) -> None:
    from llmseg_ros.weights.directory import WeightsManifest, WeightsNotFoundError, load_weights, save_weights

    def export(value: float, directory: Path) -> None:
        module = torch.nn.Linear(2, 2)
        torch.nn.init.constant_(module.weight, value)
        manifest = WeightsManifest(
            method="llmseg", base_vlm="tiny", hidden_size=8, extra={"steps": int(value)}
        )
        save_weights(directory, manifest, {"projection": module}, vlm=_Adapter(value))

    def read(directory: Path) -> float | None:
        try:
            loaded = load_weights(directory)
        except WeightsNotFoundError:
            return None
        value = float(loaded.state_dicts["projection"]["weight"][0, 0])
        assert loaded.manifest.extra["steps"] == int(value)  # manifest and tensors of one export
        assert loaded.adapter_dir is not None
        from safetensors.torch import load_file

        assert float(load_file(str(loaded.adapter_dir / "adapter_model.safetensors"))["w"][0]) == value
        return value

    call = 1
    while True:
        directory = tmp_path / f"try{call}" / "weights"
        export(1.0, directory)
        with fail_at(call, _write_targets()) as injection:
            try:
                export(2.0, directory)
                failed = False
            except Injected:
                failed = True
        seen = read(directory)
        # the previous export, or the new one when only clean-up failed; never none or a mix
        assert seen in ((1.0, 2.0) if failed else (2.0,)), (
            f"failure at call {call} ({injection.failed_call}): {seen}"
        )
        export(2.0, directory)
        assert read(directory) == 2.0
        if not injection.raised:
            break
        call += 1
    assert call > 5


def test_an_export_killed_mid_swap_is_repaired_by_the_next_write(tmp_path: Path) -> None:
    """A process killed between moving the old weights aside and renaming the new ones in."""
    from llmseg_ros.utils.atomic import atomic_directory
    from llmseg_ros.weights.directory import WeightsNotFoundError, load_weights

    directory = tmp_path / "weights"
    with atomic_directory(directory) as tmp:
        (tmp / "version").write_text("1")
    os.replace(directory, tmp_path / ".weights.old")  # the state such a kill leaves
    with pytest.raises(WeightsNotFoundError, match="weights"):
        load_weights(directory)  # a reader refuses clearly meanwhile
    with pytest.raises(RuntimeError), atomic_directory(directory):
        raise RuntimeError("the next export fails too")
    assert (directory / "version").read_text() == "1"  # the previous version is back
    with atomic_directory(directory) as tmp:
        (tmp / "version").write_text("2")
    assert (directory / "version").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]


def test_a_torn_last_metrics_line_is_dropped_at_any_byte(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from llmseg_ros.training.runlog import RunLog

    log = RunLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.append({"step": step, "loss": step / 10})
    complete = log.path.read_bytes()
    last = json.dumps({"step": 4, "loss": 0.4}).encode() + b"\n"
    for cut in range(len(last)):
        log.path.write_bytes(complete + last[:cut])
        with caplog.at_level(logging.WARNING):
            kept = log.truncate(3)
        assert [r["step"] for r in kept] == [1, 2, 3]
        assert log.path.read_bytes() == complete
        assert cut == 0 or "torn line" in caplog.text
        caplog.clear()
    assert [r["step"] for r in log.truncate(2)] == [1, 2]
    log.path.write_bytes(b'{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        log.truncate(3)


# -- end to end --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    return build_setup(tmp_path_factory.mktemp("durability"), {"train": 4})


def _trainable(trainer: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.modules.trainable_state().items()}


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_identical_result(setup: dict[str, object], tmp_path: Path) -> None:
    """SIGKILL mid-run, a torn metrics line, a damaged newest checkpoint, a planted pickle:
    each next run resumes to the same weights as an uninterrupted run, or refuses clearly."""
    from llmseg_ros.training.trainer import Trainer

    reference = Trainer(make_config(setup, tmp_path / "reference", max_steps=6), progress=False)
    reference.train()
    expected = _trainable(reference)

    config = make_config(setup, tmp_path / "killed", max_steps=6, keep_checkpoints=3)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "training/train.py"), "--config", str(config_file), "--no-progress"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 600
    try:
        while not (checkpoints / checkpoint_name(4)).is_dir():
            assert process.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    shutil.rmtree(checkpoints / checkpoint_name(6), ignore_errors=True)  # as if killed a little earlier
    metrics = tmp_path / "killed" / "metrics.jsonl"
    with open(metrics, "ab") as fh:
        fh.write(b'{"step": 5, "lr": 0.0')  # a crash mid-append
    with open(checkpoints / checkpoint_name(4) / "trainable.safetensors", "r+b") as fh:
        fh.truncate(100)  # the newest checkpoint damaged: resume from step 2

    resumed = Trainer(config, progress=False)
    result = resumed.train()
    assert result.resumed_from is not None and result.resumed_from.name == checkpoint_name(2)
    assert result.finished and result.step == 6
    for name, value in expected.items():
        assert torch.equal(_trainable(resumed)[name], value), name
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]

    # nothing intact left: refuse with a clear message, without running planted code
    marker = tmp_path / "code_ran"
    for path in checkpoints.iterdir():
        for name in ("trainable.safetensors", "optimizer.pt"):
            (path / name).unlink(missing_ok=True)
            torch.save(Payload(marker), path / name)
    import importlib.util

    spec = importlib.util.spec_from_file_location("training_train_script", REPO / "training" / "train.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit, match=r"error: none of the checkpoints in .* can be resumed from"):
        script.main(["--config", str(config_file), "--no-progress"])
    assert not marker.exists()
