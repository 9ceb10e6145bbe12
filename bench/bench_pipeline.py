"""Pipeline latency: first instruction on a frame vs further instructions on the same frame.

    python bench/bench_pipeline.py                       # tiny random models (any machine)
    python bench/bench_pipeline.py --config my.yaml      # real weights (see README)

Compares, in one process and on the same image:

* reference — what the authors' code does per query: every instruction recomputes the
  proposals, the mask embeddings and the full VLM pass (``segment(image, …)`` on a raw
  image, no per-frame cache);
* ours, first — ``prepare(frame)`` + the first instruction (which also encodes the VLM's
  image prefix);
* ours, further — another instruction on the same prepared frame (prefix KV cache reused).

Prints per-stage medians, the ratios further/first and further/reference, and peak
memory (RSS; CUDA allocator peak on a GPU). Writes JSON + Markdown (atomically).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmseg_ros.config import SegmenterConfig
from llmseg_ros.pipeline import ReasonSegmenter
from llmseg_ros.utils.atomic import write_results
from llmseg_ros.utils.imageio import read_rgb

DEMO = Path(__file__).resolve().parents[1] / "llmseg_ros" / "assets" / "kitchen.jpg"
INSTRUCTIONS = [
    "something I could stand on to reach the shelf",
    "where could I throw away these scraps?",
    "what would I drink coffee from?",
    "the thing that lets light into the room",
]


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def median_timings(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in runs for k in r})
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}


def run(config: SegmenterConfig, image_path: Path, repeats: int) -> dict[str, Any]:
    image = read_rgb(image_path)
    seg = ReasonSegmenter(config)
    t0 = time.perf_counter()
    seg.load()
    load_s = time.perf_counter() - t0
    device = seg.components.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seg.segment(image, INSTRUCTIONS[0])  # warm-up (lazy inits, allocator)
    first: list[dict[str, float]] = []
    further: list[dict[str, float]] = []
    reference: list[dict[str, float]] = []
    for r in range(repeats):
        # alternate reference and ours so drift affects both alike
        reference.append(seg.segment(image, INSTRUCTIONS[1 + r % 3]).timings)
        t = time.perf_counter()
        frame = seg.prepare(image)
        prepare_s = time.perf_counter() - t
        result = seg.segment(frame, INSTRUCTIONS[0])
        first.append({**frame.timings, **result.timings, "total": prepare_s + result.timings["total"]})
        for instruction in INSTRUCTIONS[1:]:
            further.append(seg.segment(frame, instruction).timings)
    out: dict[str, Any] = {
        "method": config.method,
        "profile": config.profile,
        "image": image_path.name,
        "image_size": list(image.shape[:2]),
        "repeats": repeats,
        "load_s": load_s,
        "first": median_timings(first),
        "further": median_timings(further),
        "reference": median_timings(reference),
        "peak_rss_mib": peak_rss_mib(),
        "machine": machine_info(device),
    }
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    out["ratio_further_vs_first"] = out["further"]["total"] / out["first"]["total"]
    out["ratio_further_vs_reference"] = out["further"]["total"] / out["reference"]["total"]
    return out


def to_markdown(res: dict[str, Any]) -> str:
    stages = sorted(
        set(res["first"]) | set(res["further"]) | set(res["reference"]), key=lambda s: s == "total"
    )
    lines = [
        f"### Pipeline latency — method `{res['method']}`, profile `{res['profile']}`",
        "",
        f"Machine: {res['machine']['cpu']} ({res['machine']['cores']} cores), device {res['machine']['device']}"
        + (f" ({res['machine']['gpu']})" if "gpu" in res["machine"] else "")
        + f", torch {res['machine']['torch']}; image {res['image']} {res['image_size'][1]}×{res['image_size'][0]};"
        f" medians of {res['repeats']} runs.",
        "",
        "| stage | reference: no reuse (s) | first instruction (s) | further instruction, same frame (s) |",
        "|---|---:|---:|---:|",
    ]
    for s in stages:
        lines.append(
            f"| {s} | {res['reference'].get(s, 0.0):.4f} | {res['first'].get(s, 0.0):.4f} | "
            f"{res['further'].get(s, 0.0):.4f} |"
        )
    lines += [
        "",
        f"- further / first: **{res['ratio_further_vs_first']:.3f}×**",
        f"- further / reference (no reuse): **{res['ratio_further_vs_reference']:.3f}×**",
        f"- peak RSS: {res['peak_rss_mib']:.0f} MiB"
        + (f"; peak CUDA allocated: {res['peak_cuda_mib']:.0f} MiB" if "peak_cuda_mib" in res else ""),
        f"- model load: {res['load_s']:.2f} s",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, help="SegmenterConfig JSON/YAML (real weights)")
    parser.add_argument("--method", default="llmseg", help="method for the tiny profile")
    parser.add_argument("--tiny-dir", type=Path, help="where the tiny profile is cached")
    parser.add_argument("--image", type=Path, default=DEMO)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.config is not None:
        config = SegmenterConfig.from_file(args.config)
    else:
        from llmseg_ros.tiny import build_tiny_profile, default_cache_dir

        print("tiny profile: tiny random models (mechanics and ratios only, not real-model latency)")
        config = build_tiny_profile(args.tiny_dir or default_cache_dir() / "tiny", method=args.method)
    result = run(config, args.image, args.repeats)
    md = to_markdown(result)
    print(md)
    stem = f"pipeline_{config.method}_{config.profile}"
    written = write_results(args.out, stem, result, md)
    print(f"written: {written[0]}, {written[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
