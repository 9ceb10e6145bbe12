#!/usr/bin/env python3
"""Benchmark the proposal stage: SAM's own automatic mask generator ("reference") against
our fast path ("fast"), same model, same images, same parameters, one process.

    python bench/bench_proposals.py --model vit_b --images 2
    python bench/bench_proposals.py --model vit_b --images 2 --worst-case
    python bench/bench_proposals.py --model tiny --images 4 --repeats 3

Without ``--checkpoint`` the model has seeded random weights, rescaled with
``llmseg_ros.tiny.sam.liven_sam`` so that the score filters keep a share of the masks as
with trained weights (``--raw-weights`` keeps PyTorch's initialisation, with which SAM's
IoU head predicts ~0 and the default filters keep nothing). The images are synthetic
scenes (shapes on a textured background, fixed seeds) at 640x480 and 1024x768.

Runs alternate between the implementations (reference first on even runs, fast first on
odd ones). Reported per implementation: median seconds per image of each stage (image
encoder, mask decoder, post-processing = everything else) and end to end; the ratio
reference / fast; and agreement: how many reference masks have a fast mask with
IoU >= 0.99 and vice versa, and whether the outputs are identical. ``--worst-case``
turns the score filters and NMS off (predicted IoU > -1e4, stability >= 0, NMS 1.0) so
that post-processing handles 3 masks for every point. ``--decoder exact`` times the
bit-exact mask decoder instead of the default factored one (see ``llmseg_ros.models.proposals``);
``--encoder-dtype`` / ``--compile-encoder`` are the fast path's CUDA options. Results go to
``<out>/proposals_<model>_<setting>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmseg_ros.config import PROPOSAL_DECODERS
from llmseg_ros.models.proposals import ProposalGenerator
from llmseg_ros.models.sam import SAM_MODEL_TYPES, build_sam
from llmseg_ros.tiny.sam import build_tiny_sam, liven_sam
from llmseg_ros.types import Proposals
from llmseg_ros.utils.atomic import write_results
from llmseg_ros.utils.device import resolve_device

IMAGE_SIZES = ((480, 640), (768, 1024))  # (H, W), used in turn
STAGES = ("image_encoder", "mask_decoder", "postprocess", "total", "cpu_total")
MATCH_IOU = 0.99


def synthetic_scene(height: int, width: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB: a smooth textured background with random filled shapes."""
    rng = np.random.default_rng(seed)
    noise = rng.random((max(2, height // 16), max(2, width // 16), 3)).astype(np.float32)
    image = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC) * 60 + 90
    image = np.clip(image + rng.normal(0, 6, (height, width, 3)), 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(6, 12))):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(min(height, width) // 12, min(height, width) // 4))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            cv2.circle(image, (cx, cy), size, color, -1)
        elif kind == 1:
            cv2.rectangle(image, (cx - size, cy - size // 2), (cx + size, cy + size // 2), color, -1)
        else:
            angle = float(rng.uniform(0, 180))
            cv2.ellipse(image, (cx, cy), (size, size // 2), angle, 0, 360, color, -1)
    return image


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
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
    }
    with suppress(OSError):
        info["load_average"] = os.getloadavg()
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def reference_stage_timer(generator: ProposalGenerator, sink: dict[str, float]) -> Iterator[None]:
    """Time the stages of SAM's generator by wrapping its predictor's methods (this
    benchmark only): ``set_image`` is the image encoder, ``predict_torch`` minus
    ``postprocess_masks`` is the mask decoder (with the prompt encoder)."""
    reference = generator._reference
    assert reference is not None
    predictor = reference.predictor
    model = predictor.model
    device = torch.device(model.device)
    originals = (predictor.set_image, predictor.predict_torch, model.postprocess_masks)

    def timed(fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _sync(device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(device)
            sink[key] = sink.get(key, 0.0) + time.perf_counter() - start
            return out

        return wrapper

    predictor.set_image = timed(originals[0], "image_encoder")
    predictor.predict_torch = timed(originals[1], "predict")
    model.postprocess_masks = timed(originals[2], "upsample")
    try:
        yield
    finally:
        del predictor.set_image, predictor.predict_torch, model.postprocess_masks


def run_once(generator: ProposalGenerator, image: np.ndarray) -> tuple[Proposals, dict[str, float]]:
    device = generator.device
    if generator.implementation == "reference":
        sink: dict[str, float] = {}
        with reference_stage_timer(generator, sink):
            _sync(device)
            cpu, start = time.process_time(), time.perf_counter()
            proposals = generator.generate(image)
            _sync(device)
            total, cpu = time.perf_counter() - start, time.process_time() - cpu
        decoder = sink.get("predict", 0.0) - sink.get("upsample", 0.0)
        encoder = sink.get("image_encoder", 0.0)
        return proposals, {
            "image_encoder": encoder,
            "mask_decoder": decoder,
            "postprocess": total - encoder - decoder,
            "total": total,
            "cpu_total": cpu,
        }
    _sync(device)
    cpu, start = time.process_time(), time.perf_counter()
    proposals = generator.generate(image)
    _sync(device)
    total, cpu = time.perf_counter() - start, time.process_time() - cpu
    t = generator.last_timings
    check = t.get("decoder_check", 0.0)  # one-time check of the decoder shortcut
    return proposals, {
        "image_encoder": t["image_encoder"],
        "mask_decoder": t["mask_decoder"],
        "postprocess": total - check - t["image_encoder"] - t["mask_decoder"],
        "total": total - check,
        "cpu_total": cpu * (total - check) / total if total > 0 else cpu,
        "decoder_check": check,
    }


def agreement(reference: Proposals, fast: Proposals) -> dict[str, Any]:
    """Mask matching at IoU >= 0.99 both ways, and exact equality of the outputs."""
    k_ref, k_fast = len(reference), len(fast)
    identical = (
        k_ref == k_fast
        and np.array_equal(reference.masks, fast.masks)
        and np.array_equal(reference.boxes, fast.boxes)
        and np.allclose(reference.predicted_iou, fast.predicted_iou, rtol=0, atol=1e-6)
        and np.allclose(reference.stability_score, fast.stability_score, rtol=0, atol=1e-6, equal_nan=True)
    )
    result: dict[str, Any] = {"reference_masks": k_ref, "fast_masks": k_fast, "identical": bool(identical)}
    if k_ref == 0 or k_fast == 0:
        result.update(reference_matched=0, fast_matched=0)
        return result
    a = torch.from_numpy(reference.masks.reshape(k_ref, -1)).float()
    b = torch.from_numpy(fast.masks.reshape(k_fast, -1)).float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    iou = inter / union.clamp(min=1)
    result.update(
        reference_matched=int((iou.max(dim=1).values >= MATCH_IOU).sum()),
        fast_matched=int((iou.max(dim=0).values >= MATCH_IOU).sum()),
    )
    return result


def build_model(args: argparse.Namespace, device: torch.device) -> tuple[Any, str]:
    if args.checkpoint is not None:
        return build_sam(args.model, args.checkpoint, device), f"checkpoint {args.checkpoint}"
    if args.model == "tiny":
        sam = build_tiny_sam(seed=args.seed)
        label = f"tiny SAM, random weights (seed {args.seed}, build_tiny_sam)"
        if args.raw_weights:
            sam = build_sam("tiny", None)
            label = "tiny SAM, random weights (PyTorch init, not rescaled)"
        return sam.to(device), label
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        sam = build_sam(args.model, None)
    if args.raw_weights:
        return sam.to(device), f"RANDOM weights (PyTorch init, seed {args.seed}), not a trained SAM"
    liven_sam(sam, args.seed)
    label = f"RANDOM weights (seed {args.seed}) rescaled by liven_sam, not a trained SAM"
    return sam.to(device), label


def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    return {stage: statistics.median(r[stage] for r in runs) for stage in STAGES}


def to_markdown(result: dict[str, Any]) -> str:
    ref, fast = result["median_seconds"]["reference"], result["median_seconds"]["fast"]
    agree = result["agreement"]
    lines = [
        f"# Proposal stage: reference vs fast ({result['model']}, {result['setting']})",
        "",
        f"- weights: {result['weights']}",
        f"- images: {result['images']} synthetic scenes {result['image_sizes']}, repeats {result['repeats']}",
        f"- parameters: {json.dumps(result['parameters'])}",
        f"- fast path: mask decoder `{result['parameters']['decoder']}`, "
        f"options {json.dumps(result.get('fast_options', {}))}",
        f"- machine: {result['machine']['device_name']} ({result['machine']['cpu_cores']} cores, "
        f"{result['machine']['torch_threads']} torch threads, load average before the run "
        f"{result['machine'].get('load_average')}), torch {result['machine']['torch']}, "
        f"device {result['machine']['device']}",
        "",
        "| stage (median s / image) | reference | fast | reference / fast |",
        "|---|---:|---:|---:|",
    ]
    for stage in STAGES:
        ratio = ref[stage] / fast[stage] if fast[stage] > 0 else float("inf")
        lines.append(f"| {stage} | {ref[stage]:.3f} | {fast[stage]:.3f} | {ratio:.2f}x |")
    lines += [
        "",
        f"End to end: reference / fast = **{result['speedup']:.2f}x** wall clock "
        f"({result['cpu_speedup']:.2f}x in process CPU time; `cpu_total` counts the CPU time of "
        "all of this process's threads, which is less sensitive to other load on the machine).",
        "",
        f"Agreement over {agree['runs']} image runs: masks reference {agree['reference_masks']}, "
        f"fast {agree['fast_masks']}; reference matched (IoU >= {MATCH_IOU}) {agree['reference_matched']}, "
        f"fast matched {agree['fast_matched']}; identical outputs in {agree['identical_runs']}/{agree['runs']} runs.",
    ]
    if result.get("decoder_check_seconds"):
        lines.append(
            f"One-time decoder check (first fast call, excluded above): {result['decoder_check_seconds']:.2f} s."
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    sam, weights = build_model(args, device)
    params: dict[str, Any] = {
        "points_per_side": args.points_per_side,
        "points_per_batch": args.points_per_batch,
    }
    if args.worst_case:
        params.update(pred_iou_thresh=-1e4, stability_score_thresh=0.0, box_nms_thresh=1.0)
    generators = {
        "reference": ProposalGenerator(sam, implementation="reference", **params),
        "fast": ProposalGenerator(
            sam,
            implementation="fast",
            decoder=args.decoder,
            encoder_dtype=args.encoder_dtype,
            compile_encoder=args.compile_encoder,
            **params,
        ),
    }
    sizes = [IMAGE_SIZES[i % len(IMAGE_SIZES)] for i in range(args.images)]
    images = [synthetic_scene(h, w, seed=1000 + i) for i, (h, w) in enumerate(sizes)]

    runs: dict[str, list[dict[str, float]]] = {"reference": [], "fast": []}
    totals = {"reference_masks": 0, "fast_masks": 0, "reference_matched": 0, "fast_matched": 0}
    identical_runs = n_runs = 0
    check_seconds = 0.0
    for repeat in range(args.repeats):
        for index, image in enumerate(images):
            order = ("reference", "fast") if (repeat + index) % 2 == 0 else ("fast", "reference")
            outputs: dict[str, Proposals] = {}
            for impl in order:
                outputs[impl], timing = run_once(generators[impl], image)
                check_seconds += timing.pop("decoder_check", 0.0)
                runs[impl].append(timing)
                print(
                    f"[repeat {repeat} image {index} {image.shape[1]}x{image.shape[0]}] {impl:9s} "
                    f"{timing['total']:.2f} s, {len(outputs[impl])} masks",
                    flush=True,
                )
            agree = agreement(outputs["reference"], outputs["fast"])
            for key in totals:
                totals[key] += agree[key]
            identical_runs += int(agree["identical"])
            n_runs += 1

    medians = {impl: summarise(r) for impl, r in runs.items()}
    return {
        "model": args.model,
        "setting": "worst-case" if args.worst_case else "default",
        "weights": weights,
        "images": args.images,
        "image_sizes": [f"{w}x{h}" for h, w in sizes],
        "repeats": args.repeats,
        "parameters": generators["fast"].config.__dict__ | {"implementation": "both"},
        "fast_options": {"encoder_dtype": args.encoder_dtype, "compile_encoder": args.compile_encoder},
        "machine": machine_info(device),
        "median_seconds": medians,
        "speedup": medians["reference"]["total"] / medians["fast"]["total"],
        "cpu_speedup": medians["reference"]["cpu_total"] / medians["fast"]["cpu_total"],
        "agreement": totals | {"identical_runs": identical_runs, "runs": n_runs},
        "decoder_check_seconds": check_seconds,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=SAM_MODEL_TYPES, default="tiny")
    parser.add_argument("--checkpoint", type=Path, default=None, help="SAM .pth (default: random weights)")
    parser.add_argument("--images", type=int, default=2, help="number of synthetic images")
    parser.add_argument("--repeats", type=int, default=1, help="passes over the images")
    parser.add_argument("--worst-case", action="store_true", help="no score filters, no NMS")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument(
        "--decoder", choices=PROPOSAL_DECODERS, default="factored", help="the fast path's mask decoder"
    )
    parser.add_argument(
        "--encoder-dtype", choices=("float16", "bfloat16"), default=None, help="fast path, CUDA only"
    )
    parser.add_argument(
        "--compile-encoder", action="store_true", help="torch.compile the encoder (fast, CUDA)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random-weights seed")
    parser.add_argument("--raw-weights", action="store_true", help="random weights without liven_sam")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.images < 1 or args.repeats < 1:
        parser.error("--images and --repeats must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)

    result = run(args)
    markdown = to_markdown(result)
    print()
    print(markdown)
    stem = f"proposals_{args.model}_{result['setting']}"
    write_results(args.out, stem, result, markdown)
    print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
