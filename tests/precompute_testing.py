"""Shared by the precompute tests and their worker processes: deterministic stand-ins for the
proposal stage and the backbone, test images, cache comparison, launching 2-process jobs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from llmseg_ros.data.io import write_image
from llmseg_ros.training.precompute import PrecomputeSummary, precompute_cache
from llmseg_ros.types import Proposals

REPO = Path(__file__).resolve().parents[1]


def fake_proposals(image: np.ndarray) -> Proposals:
    """Deterministic proposals from the pixels: K = 1 + (sum of pixels mod 3) threshold masks."""
    h, w = image.shape[:2]
    grey = image.astype(np.int64).sum(axis=2)
    k = 1 + int(grey.sum() % 3)
    masks = np.stack([grey > np.percentile(grey, 20 + 25 * i) for i in range(k)])
    rng = np.random.default_rng(int(grey.sum()) % 1000)
    return Proposals(
        masks=masks,
        predicted_iou=rng.random(k).astype(np.float32),
        stability_score=rng.random(k).astype(np.float32),
        boxes=rng.random((k, 4)).astype(np.float32) * w,
        point_coords=rng.random((k, 2)).astype(np.float32) * h,
    )


def fake_features(image: np.ndarray) -> np.ndarray:
    """(4, 2, 2) float32 features: per-channel means of the image quadrants, plus a constant."""
    h, w = image.shape[:2]
    quads = [
        image[: h // 2, : w // 2],
        image[: h // 2, w // 2 :],
        image[h // 2 :, : w // 2],
        image[h // 2 :, w // 2 :],
    ]
    means = np.array([q.reshape(-1, 3).mean(0) for q in quads], dtype=np.float32).T.reshape(3, 2, 2)
    return np.concatenate([means / 255.0, np.full((1, 2, 2), 0.5, np.float32)])


def fill_fake(paths: list[Path], out: Path, *, shard_size: int = 2, **options: Any) -> PrecomputeSummary:
    """Fill the cache ``out`` with the fake proposals and features (no progress bar)."""
    return precompute_cache(
        paths,
        out,
        options.pop("generate", fake_proposals),
        features=fake_features,
        feature_model="fake",
        feature_input_size=28,
        shard_size=shard_size,
        progress=False,
        **options,
    )


def write_images(folder: Path, count: int, *, duplicate_of: int | None = None) -> list[Path]:
    """``count`` random PNGs ``img_NN.png`` of different heights (and a byte copy of one)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        image = rng.integers(0, 256, size=(20 + i, 24, 3), dtype=np.uint8)
        paths.append(write_image(folder / f"img_{i:02d}.png", image))
    if duplicate_of is not None:
        dup = folder / "copy.png"
        dup.write_bytes(paths[duplicate_of].read_bytes())
        paths.append(dup)
    return paths


def tree_bytes(directory: Path, *, skip: tuple[str, ...] = ("summary.json",)) -> dict[str, bytes]:
    """Relative path → bytes of every file under ``directory`` (hidden ones too), but ``skip``."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_env(home: Path) -> dict[str, str]:
    """The environment of a launched job: this checkout first, no user accelerate config."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env["HF_HOME"] = str(home)  # accelerate reads its default config from here
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(script: Path, args: list[str], *, cwd: Path, nproc: int = 2, timeout: float = 240):
    """Run ``script`` in ``nproc`` CPU processes with ``torchrun`` (gloo; a free port of its own)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        str(script),
        *args,
    ]  # fmt: skip  (--standalone: the rendezvous takes a free port itself, no race with other jobs)
    return subprocess.run(
        command, cwd=cwd, env=launch_env(cwd), capture_output=True, text=True, timeout=timeout
    )


def accelerate_launch(script: Path, args: list[str], *, cwd: Path, nproc: int = 2, timeout: float = 240):
    """Run ``script`` in ``nproc`` CPU processes with ``accelerate launch`` (``--multi_gpu``
    starts them through torchrun; the scripts join with the gloo backend)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(script), *args,
    ]  # fmt: skip
    return subprocess.run(
        command, cwd=cwd, env=launch_env(cwd), capture_output=True, text=True, timeout=timeout
    )
