"""Tracking update vs full re-query: per-frame cost of keeping an answer alive.

    python bench/bench_tracking.py                    # tiny and ViT-B SAM (random weights)
    python bench/bench_tracking.py --model vit_b --repeats 3
    python bench/bench_tracking.py --config my.yaml   # real weights (see README)
    python bench/bench_tracking.py --model vit_b --sam2 random-hiera-tiny   # + the sam2 backend

On the same new frame, in one process, alternating the order:

* full re-query — what a planner pays without tracking: ``segment(image, instruction)``
  on the raw frame (proposals with SAM's encoder, mask embeddings, VLM, selector);
* tracking update — ``tracker.update(image)`` on the raw frame (SAM's encoder + one
  prompted decode with the previous mask's box, points and logits);
* tracking update, prepared frame — the same on a frame whose SAM encoding already exists
  (e.g. the node prepares every frame in the background): the decode alone.

Each repeat starts a fresh track on the previous frame (not timed) and times one update,
so every timed update really decodes (a random model's mask can vanish in a few frames).
Frames are the demo image shifted by a few pixels per frame. Without ``--config`` the
models are random: the tiny profile (tiny SAM, DINOv2, LLaVA), and for ``vit_b`` the same
with SAM ViT-B (random weights rescaled by ``liven_sam``, loaded from a checkpoint on
disk). The full query's VLM and DINOv2 are tiny, so with real ones (7B VLM, DINOv2-L) a
full query costs more and the ratio is smaller. Proposals use the reference settings
(``--points-per-side`` 32) unless told otherwise. ``--sam2`` also times the ``sam2``
backend's update (SAM 2's own encoder + memory attention + decoder + memory encoder) on
the same frames. Prints medians per stage and the ratios; writes
``<out>/tracking_<model>.{json,md}`` atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import DEMO, machine_info, median_timings, peak_rss_mib

from llmseg_ros.config import ProposalConfig, SegmenterConfig, TrackerConfig
from llmseg_ros.pipeline import ReasonSegmenter
from llmseg_ros.types import SegmentResult
from llmseg_ros.utils.atomic import write_results
from llmseg_ros.utils.imageio import read_rgb

INSTRUCTION = "something I could stand on to reach the shelf"
SHIFT_PX = 3  # camera motion between frames
# Propagation only: no re-query, never lost or expired, so every update decodes.
BENCH_TRACKER = TrackerConfig(requery_below=0.0, lost_requery_every=0, lost_below=0.0, timeout_s=1e6)


def frames_of(image: np.ndarray, count: int) -> list[np.ndarray]:
    """``count`` frames: the image shifted right by ``SHIFT_PX`` pixels per frame."""
    return [np.ascontiguousarray(np.roll(image, SHIFT_PX * i, axis=1)) for i in range(count)]


def start_answer(seg: ReasonSegmenter, image: np.ndarray) -> SegmentResult:
    """The full answer on ``image`` when it is not empty, else the frame's largest proposal
    (random models often answer "nothing"; tracking needs something to follow)."""
    result = seg.segment(image, INSTRUCTION)
    if result.mask.any():
        return result
    frame = seg.prepare(image)
    if len(frame.proposals):
        mask = frame.proposals.masks[0]
    else:  # no proposal at all: a central box
        h, w = image.shape[:2]
        mask = np.zeros((h, w), bool)
        mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True
    result.mask = mask
    return result


def time_update(
    seg: ReasonSegmenter,
    before: np.ndarray,
    now: np.ndarray,
    answer: SegmentResult,
    update: list[dict[str, float]],
    prepared: list[dict[str, float]],
) -> None:
    """One update on the raw frame ``now`` and one on its prepared frame (each a fresh
    track started on ``before``, not timed)."""
    tracker = seg.track(before, answer, config=BENCH_TRACKER, stamp_ns=0)
    result = tracker.update(now, stamp_ns=1)
    assert "propagate" in result.timings and "sam_encoder" in result.timings
    update.append(result.timings)
    tracker = seg.track(before, answer, config=BENCH_TRACKER, stamp_ns=0)
    frame = seg.prepare(now)  # not timed: the encoding exists before the update
    result = tracker.update(frame, stamp_ns=1)
    assert "propagate" in result.timings and "sam_encoder" not in result.timings
    prepared.append(result.timings)


def time_full(seg: ReasonSegmenter, now: np.ndarray, full: list[dict[str, float]]) -> None:
    """One full query on the raw frame ``now``, with the proposal stage's own split
    (``proposals/image_encoder``, ``proposals/mask_decoder``, ...)."""
    timings = dict(seg.segment(now, INSTRUCTION).timings)
    if "proposal_generator" in seg.components.loaded:
        stages = seg.components.proposal_generator().last_timings
        timings.update({f"proposals/{k}": v for k, v in stages.items() if k != "total"})
    full.append(timings)


def time_sam2_update(
    seg: ReasonSegmenter,
    before: np.ndarray,
    now: np.ndarray,
    answer: SegmentResult,
    sam2: str,
    out: list[dict[str, float]],
) -> None:
    """One SAM 2 update on the raw frame ``now`` (a fresh track started on ``before``, not timed)."""
    config = dataclasses.replace(BENCH_TRACKER, backend="sam2", sam2_model=sam2)
    result = seg.track(before, answer, config=config, stamp_ns=0).update(now, stamp_ns=1)
    assert "propagate" in result.timings
    out.append(result.timings)


def run(config: SegmenterConfig, image: np.ndarray, repeats: int, sam2: str | None = None) -> dict[str, Any]:
    seg = ReasonSegmenter(config)
    t0 = time.perf_counter()
    seg.load()
    load_s = time.perf_counter() - t0
    frames = frames_of(image, repeats + 2)
    start = start_answer(seg, frames[0])  # also the warm-up of the full query
    answers = [
        dataclasses.replace(start, mask=np.roll(start.mask, SHIFT_PX * i, axis=1)) for i in range(len(frames))
    ]
    seg.track(frames[0], answers[0], config=BENCH_TRACKER).update(frames[1])  # warm-up
    sam2_updates: list[dict[str, float]] = []
    if sam2 is not None:
        time_sam2_update(seg, frames[0], frames[1], answers[0], sam2, [])  # load + warm-up
    full: list[dict[str, float]] = []
    update: list[dict[str, float]] = []
    prepared: list[dict[str, float]] = []
    for r in range(repeats):
        before, now = frames[r], frames[r + 1]
        if r % 2:  # alternate the order so drift affects both alike
            time_full(seg, now, full)
        time_update(seg, before, now, answers[r], update, prepared)
        if sam2 is not None:
            time_sam2_update(seg, before, now, answers[r], sam2, sam2_updates)
        if not r % 2:
            time_full(seg, now, full)
    out: dict[str, Any] = {
        "model": config.sam_model_type,
        "profile": config.profile,
        "image": DEMO.name,
        "image_size": list(image.shape[:2]),
        "points_per_side": config.proposals.points_per_side,
        "repeats": repeats,
        "load_s": load_s,
        "full_query": median_timings(full),
        "update": median_timings(update),
        "update_prepared": median_timings(prepared),
        "peak_rss_mib": peak_rss_mib(),
        "machine": machine_info(seg.components.device),
    }
    out["ratio_update_vs_full"] = out["update"]["total"] / out["full_query"]["total"]
    if sam2_updates:
        out["update_sam2"] = median_timings(sam2_updates)
        out["ratio_sam2_update_vs_full"] = out["update_sam2"]["total"] / out["full_query"]["total"]
    out["ratio_prepared_update_vs_full"] = out["update_prepared"]["total"] / out["full_query"]["total"]
    seg.close()
    return out


def to_markdown(res: dict[str, Any]) -> str:
    full, upd, prep = res["full_query"], res["update"], res["update_prepared"]
    stages = sorted(set(full) | set(upd) | set(prep), key=lambda s: (s == "total", s))
    m = res["machine"]
    lines = [
        f"### Tracking update vs full re-query — SAM `{res['model']}`, profile `{res['profile']}`",
        "",
        f"Machine: {m['cpu']} ({m['cores']} cores, {m['threads']} torch threads), device {m['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else "")
        + f", torch {m['torch']}; image {res['image']} {res['image_size'][1]}×{res['image_size'][0]}"
        f" shifted {SHIFT_PX} px per frame; proposals {res['points_per_side']}×{res['points_per_side']} points;"
        f" medians of {res['repeats']} runs.",
        "",
        "| stage | full re-query (s) | tracking update (s) | update, prepared frame (s) |",
        "|---|---:|---:|---:|",
    ]
    for s in stages:
        lines.append(f"| {s} | {full.get(s, 0.0):.4f} | {upd.get(s, 0.0):.4f} | {prep.get(s, 0.0):.4f} |")
    lines += [
        "",
        f"- tracking update / full re-query: **{res['ratio_update_vs_full']:.3f}×**",
        f"- update on a prepared frame / full re-query: **{res['ratio_prepared_update_vs_full']:.4f}×**",
        f"- peak RSS: {res['peak_rss_mib']:.0f} MiB; model load: {res['load_s']:.2f} s",
    ]
    if "update_sam2" in res:
        sam2 = res["update_sam2"]
        lines.insert(
            -1,
            f"- SAM 2 backend ({res['sam2']}) update: {sam2['total']:.4f} s = "
            f"**{res['ratio_sam2_update_vs_full']:.3f}×** the full re-query",
        )
    return "\n".join(lines) + "\n"


def random_config(model: str, cache: Path, workdir: Path, points_per_side: int) -> SegmenterConfig:
    """The tiny profile, with a random SAM of ``model`` saved under ``workdir`` for ViT sizes."""
    from llmseg_ros.tiny import build_tiny_profile

    config = build_tiny_profile(cache)
    config = config.replace(proposals=ProposalConfig(points_per_side=points_per_side))
    if model == "tiny":
        return config
    from llmseg_ros.models.sam import build_sam
    from llmseg_ros.tiny.sam import liven_sam

    torch.manual_seed(0)
    path = workdir / f"sam_{model}_random.pth"
    torch.save(liven_sam(build_sam(model, None)).state_dict(), path)
    return config.replace(sam_model_type=model, sam_checkpoint=str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, help="SegmenterConfig JSON/YAML (real weights)")
    parser.add_argument("--model", choices=("tiny", "vit_b", "both"), default="both", help="random SAM size")
    parser.add_argument("--points-per-side", type=int, default=32, help="proposal grid of the full query")
    parser.add_argument("--tiny-dir", type=Path, help="where the tiny profile is cached")
    parser.add_argument("--image", type=Path, default=DEMO)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--sam2",
        help="also time the sam2 backend: a SAM 2 video model directory / hub id, or 'random-hiera-tiny' "
        "(SAM 2.1 hiera-tiny's architecture with random weights, saved and loaded from a temporary directory)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    image = read_rgb(args.image)
    with tempfile.TemporaryDirectory(prefix="bench_tracking_") as tmp:
        if args.config is not None:
            configs = [SegmenterConfig.from_file(args.config)]
        else:
            from llmseg_ros.tiny import default_cache_dir

            print("random weights: tiny models stand in for DINOv2 and the VLM (mechanics and ratios only)")
            cache = args.tiny_dir or default_cache_dir() / "tiny"
            models = ["tiny", "vit_b"] if args.model == "both" else [args.model]
            configs = [random_config(m, cache, Path(tmp), args.points_per_side) for m in models]
        sam2 = args.sam2
        if sam2 == "random-hiera-tiny":
            from transformers import Sam2VideoConfig

            from llmseg_ros.tiny.sam2 import save_sam2_video

            sam2 = str(save_sam2_video(Path(tmp) / "sam2_hiera_tiny_random", Sam2VideoConfig()))
        for config in configs:
            result = run(config, image, args.repeats, sam2)
            if args.sam2 is not None:
                result["sam2"] = args.sam2
            md = to_markdown(result)
            print(md)
            stem = f"tracking_{result['model']}"
            written = write_results(args.out, stem, result, md)
            print(f"written: {written[0]}, {written[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
