"""Precompute in several processes: 2 CPU processes (gloo) under ``accelerate launch`` and
``torchrun`` write the same bytes as one process; a job killed mid-shard is finished by the
next run without computing any shard twice; claims hand a dead process's shard over."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from precompute_testing import (
    REPO,
    accelerate_launch,
    fake_proposals,
    fill_fake,
    torchrun,
    tree_bytes,
    write_images,
)

from llmseg_ros.data.io import write_image
from llmseg_ros.training.cache import ProposalCache, finished_shards
from llmseg_ros.training.claims import CLAIM_DIR, ClaimOwner, ShardClaims

WORKER = Path(__file__).resolve().parent / "precompute_worker.py"


def plant_claim(directory: Path, owner: ClaimOwner, shard: int, generation: int = 0) -> Path:
    """A claim file as another process (alive elsewhere, or dead) leaves it: claims/{shard}.{generation}."""
    path = directory / CLAIM_DIR / f"{shard:05d}.{generation}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(owner)), encoding="utf-8")
    return path


def reference_cache(paths: list[Path], out: Path, shard_size: int) -> dict[str, bytes]:
    """The cache one uninterrupted process writes (fake stages), as relative path → bytes."""
    fill_fake(paths, out, shard_size=shard_size)
    return tree_bytes(out)


@pytest.mark.slow
def test_two_processes_write_the_bytes_of_one(tmp_path: Path) -> None:
    """training/precompute.py with the tiny SAM and DINOv2: accelerate launch, 2 CPU processes."""
    images = tmp_path / "images"
    rng = np.random.default_rng(5)
    for index in range(4):
        write_image(images / f"img{index}.png", rng.integers(0, 256, (36 + 6 * index, 48, 3), dtype=np.uint8))
    args = f"--images {images} --out cache --profile tiny --features --device cpu --shard-size 1"
    one, two = tmp_path / "one", tmp_path / "two"
    for run in (one, two):
        run.mkdir()
    single = subprocess.run(
        [sys.executable, str(REPO / "training" / "precompute.py"), *args.split(), "--no-progress"],
        cwd=one,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert single.returncode == 0, single.stderr
    job = accelerate_launch(REPO / "training" / "precompute.py", args.split(), cwd=two)
    assert job.returncode == 0, job.stderr[-3000:]
    # the same files, byte for byte (the tiny models live in the output folder, so the
    # runs use the same relative --out from two working folders)
    expected, got = tree_bytes(one / "cache"), tree_bytes(two / "cache")
    assert sorted(got) == sorted(expected) and got == expected
    assert not (two / "cache" / CLAIM_DIR).exists()
    # one summary, from rank 0, with both ranks' throughput
    assert job.stdout.count("4 images in 4 shards") == 1
    assert "over 2 processes (rank 0 " in job.stdout and ", rank 1 " in job.stdout
    summary = json.loads((two / "cache" / "summary.json").read_text(encoding="utf-8"))
    assert summary["world_size"] == 2 and summary["computed"] == 4
    assert sum(rank["computed"] for rank in summary["ranks"]) == 4
    assert [rank["rank"] for rank in summary["ranks"]] == [0, 1]
    assert summary["images_per_second"] > 0
    assert "proposals: 100%" in job.stderr  # rank 0's bar covers the whole job


@pytest.mark.slow
def test_a_job_killed_mid_shard_is_finished_by_the_next_run(tmp_path: Path) -> None:
    """torchrun, 2 processes: rank 1 dies (SIGKILL) mid-shard, the launcher stops rank 0 mid-shard;
    a second job finishes the cache: same bytes as one uninterrupted run, no shard done twice."""
    paths = write_images(tmp_path / "images", 6)
    expected = reference_cache(paths, tmp_path / "reference", shard_size=2)
    out = tmp_path / "cache"
    crashed = torchrun(WORKER, [str(out), str(tmp_path / "images"), "2", "crash"], cwd=tmp_path)
    assert crashed.returncode != 0
    # what survived: rank 0's first shard, complete and exact; nothing half-written counts
    assert finished_shards(out, True) == {0}
    survived = tree_bytes(out)
    assert {name for name in survived if name.startswith("shards/")} == {
        "shards/00000.jsonl",
        "shards/00000.npz",
    }
    for name in ("cache.json", "shards/00000.jsonl", "shards/00000.npz"):
        assert survived[name] == expected[name], name
    assert len(ProposalCache(out)) == 2 and not ProposalCache(out).is_complete
    assert sorted(p.name for p in (out / CLAIM_DIR).iterdir() if not p.name.startswith(".")) == [
        "00001.0",
        "00002.0",
    ]  # the dead ranks' claims

    rerun = torchrun(WORKER, [str(out), str(tmp_path / "images"), "2"], cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["shards_skipped"] == 1 and summary["computed"] == 4  # shards 1 and 2, once each
    # (a rank may take both: the other's share is free for whoever comes first)
    assert sum(rank["shards"] for rank in summary["ranks"]) == 2 and len(summary["ranks"]) == 2
    assert tree_bytes(out) == expected  # claims gone, no temporary file, every shard exact
    assert not (out / CLAIM_DIR).exists()


def test_claims_are_exclusive_and_a_dead_owner_is_taken_over(tmp_path: Path) -> None:
    alive = ShardClaims(tmp_path, ClaimOwner.this_process("job-a", 0), lease_seconds=60)
    other = ShardClaims(tmp_path, ClaimOwner.this_process("job-a", 1), lease_seconds=60)
    with alive, other:
        assert alive.try_claim(3) and alive.try_claim(3)  # held: claiming again is a no-op
        assert not other.try_claim(3)  # a live owner (this very process) keeps it
        assert other.holder(3) == alive.owner
        alive.abandon(3)
        assert other.try_claim(3) and not alive.try_claim(3)
        other.release(3)
        assert list(alive.folder.iterdir()) == []
    # a claim of a process that no longer exists on this host: taken over at once
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    plant_claim(tmp_path, ClaimOwner(job="old", rank=0, host=alive.owner.host, pid=int(dead.stdout)), 5)
    taker = ShardClaims(tmp_path, ClaimOwner.this_process("new", 0), lease_seconds=60)
    assert taker.holder(5) is None
    with taker:
        assert taker.try_claim(5)
        assert sorted(p.name for p in taker.folder.iterdir()) == ["00005.0", "00005.1"]
        taker.release(5)
    # a claim from another host is trusted until it goes silent for the lease
    claim = plant_claim(tmp_path, ClaimOwner("remote", 0, "another-host", 1), 7)
    patient = ShardClaims(tmp_path, ClaimOwner.this_process("new", 0), lease_seconds=60)
    assert not patient.try_claim(7)
    os.utime(claim, (claim.stat().st_atime - 120, claim.stat().st_mtime - 120))
    assert patient.holder(7) is None and patient.try_claim(7)
    with pytest.raises(ValueError, match="lease_seconds"):
        ShardClaims(tmp_path, patient.owner, lease_seconds=0)


def test_a_shard_held_by_a_live_process_is_waited_for_not_recomputed(tmp_path: Path) -> None:
    """Another live process holds shard 0: this run computes shard 1, waits, then sees 0 published."""
    paths = write_images(tmp_path / "images", 4)
    out = tmp_path / "cache"
    expected = reference_cache(paths, tmp_path / "reference", shard_size=2)
    # plan the cache, then let a "remote" process hold shard 0 with a fresh heartbeat
    fill_fake(paths, out, max_shards=1)
    for name in ("00000.jsonl", "00000.npz"):
        (out / "shards" / name).unlink()
    plant_claim(out, ClaimOwner("remote", 0, "another-host", 1), 0)
    computed: list[int] = []

    def generate(image: np.ndarray):
        computed.append(image.shape[0])
        if len(computed) == 2:  # shard 1 done: the holder publishes shard 0 meanwhile
            for name in ("00000.jsonl", "00000.npz"):
                (out / "shards" / name).write_bytes(expected[f"shards/{name}"])
        return fake_proposals(image)

    summary = fill_fake(paths, out, generate=generate, lease_seconds=60)
    assert computed == [22, 23] and summary.computed == 2  # only shard 1's images
    assert tree_bytes(out) == expected
