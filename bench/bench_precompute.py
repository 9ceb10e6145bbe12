#!/usr/bin/env python3
"""Benchmark the precompute run: images per second with one process and with N processes
(``torchrun``, gloo; same images, same models, the same cache bytes), and the batched
DINOv2 backbone against the per-image one it replaces.

    python bench/bench_precompute.py --model tiny --images 8 --processes 2
    python bench/bench_precompute.py --model vit_b --dinov2 large --images 2 --processes 2
    python bench/bench_precompute.py --model vit_h --dinov2 large --images 32 --processes 8 \
        --device cuda --encoder-dtype bfloat16 --feature-batch-size 8        # 8 GPUs

Models have seeded random weights (SAM rescaled by ``liven_sam``, as in
``bench_proposals.py``; DINOv2 at the real size: ``large`` is ViT-L/14 at 896 px, 1024 ×
64 × 64 features per image), so the cost is the real networks' cost; SAM's decoder and
post-processing depend on how many masks pass the filters, which trained weights change.
Scenes are synthetic, 640×480. Each run is a fresh process (1 process: plain ``python``;
N processes: ``torchrun``) that builds its models and then fills an empty cache; the
figures are the run's own summary (after one untimed image per process): images per
second of the whole job and per process, and seconds per image of each stage. Every
process uses ``--threads`` CPU threads (1 by default, so that the scaling with processes is
not mixed up with the scaling with threads); with ``--device cuda`` each process uses its
own GPU. Results go to ``<out>/precompute_<model>_<dinov2>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_proposals import _sync, build_model, synthetic_scene

from llmseg_ros.config import ProposalConfig
from llmseg_ros.data.io import write_image
from llmseg_ros.models.embeddings import MaskEmbedder
from llmseg_ros.models.proposals import ProposalGenerator
from llmseg_ros.tiny import TINY_PROPOSALS
from llmseg_ros.training.precompute import precompute_cache
from llmseg_ros.training.precompute_run import ENCODER_DTYPES, dinov2_batch_features
from llmseg_ros.utils.atomic import write_results
from llmseg_ros.utils.device import resolve_device
from llmseg_ros.utils.distributed import launched_world, rank_device

DINOV2_SIZES = {  # hidden, layers, heads (facebook/dinov2-*)
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
SCENE = (480, 640)


def build_dinov2(size: str, input_size: int, seed: int) -> MaskEmbedder:
    from transformers import Dinov2Config, Dinov2Model

    hidden, layers, heads = DINOV2_SIZES[size]
    config = Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, patch_size=14, image_size=518
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MaskEmbedder(Dinov2Model(config), input_size=input_size)


def worker(args: argparse.Namespace) -> None:
    """One process of a timed run: join the job, build the models on its device, fill the cache."""
    torch.set_num_threads(args.threads)
    with launched_world() as world:
        device = resolve_device(rank_device(args.device, world))
        model_args = argparse.Namespace(model=args.model, checkpoint=None, seed=0, raw_weights=False)
        sam, _ = build_model(model_args, device)
        proposals = TINY_PROPOSALS if args.model == "tiny" else ProposalConfig()
        encoder_dtype = None if args.encoder_dtype == "float32" else args.encoder_dtype
        generator = ProposalGenerator.from_config(sam, proposals, encoder_dtype=encoder_dtype)
        warmup = synthetic_scene(*SCENE, seed=999)
        generator.generate(warmup)  # untimed: one-time costs of the first call
        features = None
        if args.dinov2 != "none":
            embedder = build_dinov2(args.dinov2, args.embed_size, seed=0).to(device)

            def features(images: Sequence[np.ndarray]) -> np.ndarray:
                return dinov2_batch_features(embedder, images).to(torch.float16).cpu().numpy()

            features([warmup])
        summary = precompute_cache(
            sorted(Path(args.worker[1]).glob("*.png")),
            args.worker[0],
            generator.generate,
            batch_features=features,
            feature_batch_size=args.feature_batch_size,
            feature_model=f"random dinov2-{args.dinov2}",
            feature_input_size=args.embed_size,
            shard_size=1,
            progress=False,
            world=world,
        )
        if world.is_main:
            print("SUMMARY " + json.dumps(summary.to_dict()), flush=True)


def timed_run(args: argparse.Namespace, images: Path, out: Path, processes: int) -> dict[str, Any]:
    threads = args.threads
    command = [str(Path(__file__).resolve()), *args.forward, "--worker", str(out), str(images)]
    if processes == 1:
        command = [sys.executable, *command]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                   "--master-port", str(args.port), *command]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"run with {processes} process(es) failed:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("SUMMARY "))
    return {"processes": processes, "threads_per_process": threads, **json.loads(line[len("SUMMARY ") :])}


def backbone_ratio(args: argparse.Namespace) -> dict[str, Any]:
    """Per-image DINOv2 calls (the reference) against one batched call, same images."""
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    embedder = build_dinov2(args.dinov2, args.embed_size, seed=0).to(device)
    images = [synthetic_scene(*SCENE, seed=100 + i) for i in range(args.feature_batch_size)]
    embedder.backbone_features(images[0])  # untimed: one-time costs of the first call
    single_times, batch_times = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        single = [embedder.backbone_features(image) for image in images]
        _sync(device)
        single_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        batched = dinov2_batch_features(embedder, images)
        _sync(device)
        batch_times.append(time.perf_counter() - start)
    difference = float(max((a.float() - b.float()).abs().max() for a, b in zip(single, batched, strict=True)))
    per_image, per_batch = statistics.median(single_times), statistics.median(batch_times)
    return {
        "batch": len(images),
        "seconds_per_image_single": per_image / len(images),
        "seconds_per_image_batched": per_batch / len(images),
        "ratio": per_image / per_batch,
        "max_abs_difference": difference,
        "repeats": args.repeats,
    }


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Precompute throughput ({result['model']} SAM, DINOv2 {result['dinov2']})",
        "",
        f"- weights: random (seeded); {result['images']} synthetic scenes {SCENE[1]}x{SCENE[0]}, shard size 1, "
        f"feature batch {result['feature_batch_size']}",
        f"- machine: {result['machine']}; device `{result['device']}`, SAM encoder {result['encoder_dtype']}",
        "",
        "| processes | threads each | images/s (job) | per process | s per image (one process) "
        "| proposals | features |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for run in result["runs"]:
        per_rank = ", ".join(f"{r['images_per_second']:.3f}" for r in run["ranks"])
        lines.append(
            f"| {run['processes']} | {run['threads_per_process']} | {run['images_per_second']:.3f} | {per_rank} | "
            f"{run['seconds_per_image']:.2f} | {run['proposal_seconds_per_image']:.2f} | "
            f"{run['feature_seconds_per_image']:.2f} |"
        )
    lines += ["", f"N processes / 1 process, images/s: **{result['scaling']:.2f}×**"]
    if result.get("backbone"):
        b = result["backbone"]
        lines += [
            "",
            f"DINOv2 backbone, {b['batch']} images: per-image calls {b['seconds_per_image_single']:.2f} s/image, "
            f"one batched call {b['seconds_per_image_batched']:.2f} s/image: **{b['ratio']:.2f}×** "
            f"(max |difference| {b['max_abs_difference']:.2e}; median of {b['repeats']})",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", choices=("tiny", "vit_b", "vit_l", "vit_h"))
    parser.add_argument("--dinov2", default="none", choices=("none", *DINOV2_SIZES))
    parser.add_argument("--embed-size", type=int, default=896, help="DINOv2 input side (896)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--feature-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="backbone comparison repeats")
    parser.add_argument("--port", type=int, default=29533, help="torchrun master port")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (1)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (each process its own GPU) | auto")
    parser.add_argument(
        "--encoder-dtype", default="float32", choices=ENCODER_DTYPES, help="SAM encoder (CUDA)"
    )
    parser.add_argument("--worker", nargs=2, metavar=("OUT", "IMAGES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    args.forward = [
        "--model", args.model, "--dinov2", args.dinov2, "--embed-size", str(args.embed_size),
        "--feature-batch-size", str(args.feature_batch_size), "--threads", str(args.threads),
        "--device", args.device, "--encoder-dtype", args.encoder_dtype,
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-precompute-") as scratch:
        images = Path(scratch) / "images"
        for index in range(args.images):
            write_image(images / f"scene{index:03d}.png", synthetic_scene(*SCENE, seed=index))
        runs = [timed_run(args, images, Path(scratch) / f"cache_{n}", n) for n in (1, args.processes)]
        same = all(
            (
                Path(scratch) / "cache_1" / p.relative_to(Path(scratch) / f"cache_{args.processes}")
            ).read_bytes()
            == p.read_bytes()
            for p in (Path(scratch) / f"cache_{args.processes}" / "shards").iterdir()
        )
    result = {
        "model": args.model,
        "dinov2": args.dinov2,
        "images": args.images,
        "feature_batch_size": args.feature_batch_size,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "device": args.device,
        "encoder_dtype": args.encoder_dtype,
        "runs": runs,
        "scaling": runs[1]["images_per_second"] / runs[0]["images_per_second"],
        "same_cache_bytes": same,
        "backbone": backbone_ratio(args) if args.dinov2 != "none" else None,
    }
    name = f"precompute_{args.model}_{args.dinov2}"
    write_results(args.out, name, result, to_markdown(result))
    print(to_markdown(result))
    print(f"same cache bytes with 1 and {args.processes} processes: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
