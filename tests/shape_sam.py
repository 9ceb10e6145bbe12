"""A tiny SAM trained briefly on synthetic moving shapes, for the tracking acceptance test.

A random SAM gives meaningless masks, so tracking quality can only be tested with a
trained one. :func:`train_shape_sam` trains the tiny architecture (``build_sam("tiny")``)
from scratch on pairs of consecutive frames of synthetic moving-object sequences
(:mod:`llmseg_ros.data.motion`, seeds disjoint from the test's) exactly as the tracker
prompts it: the next frame is prompted with the previous mask's expanded box, points
sampled inside and around it (:mod:`llmseg_ros.tracking.prompts`), and a dense prompt
that is either the previous mask as binary logits (a track's first step) or the model's
own low-resolution logits on the previous frame (every later step). Loss: binary cross
entropy + dice on the low-resolution logits, and the IoU head's squared error against the
IoU it predicts for (so the tracker's confidence means something). The checkpoint is
written where the caller says (a test's tmp path) and loaded back through
``build_sam("tiny", path)``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from llmseg_ros.data.motion import MotionConfig, MotionSequence, generate_motion_sequence
from llmseg_ros.models.sam import build_tiny_sam_architecture
from llmseg_ros.models.sam_prompting import SamImageEncoding, decode_low_res, sam_input_tensor
from llmseg_ros.models.sam_tracking import MASK_PROMPT_LOGIT, mask_prompt_from_mask
from llmseg_ros.tracking.prompts import expand_box, mask_box, sample_points
from llmseg_ros.utils.atomic import atomic_write_stream

TRAIN_SEED_OFFSET = 10_000  # training sequences never share a seed with a test's


def training_pool(count: int, rng: np.random.Generator) -> list[MotionSequence]:
    """Short sequences with every kind of event the tracker meets (module docstring)."""
    pool = []
    for i in range(count):
        config = MotionConfig(
            num_frames=16,
            target_radius=float(rng.uniform(0.2, 0.28)),
            start_scale=float(rng.uniform(0.75, 1.25)),
            end_scale=float(rng.uniform(0.75, 1.25)),
            travel=0.45,
            occluder_radius=0.55 if rng.random() < 0.75 else 0.0,
            occlusion=(0.15, 0.85),
            distractors=int(rng.integers(0, 3)),
            exit=bool(rng.random() < 0.25),
        )
        pool.append(generate_motion_sequence(TRAIN_SEED_OFFSET + i, config))
    return pool


def _target(sam: Sam, encoding: SamImageEncoding, mask: np.ndarray) -> torch.Tensor:
    """The ground truth at low resolution, area fractions in [0, 1]."""
    return (mask_prompt_from_mask(sam, encoding, mask) / MASK_PROMPT_LOGIT + 1.0) / 2.0


def _prompt(mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box + points from ``mask`` with random point counts around the tracker's defaults."""
    box = expand_box(mask_box(mask), float(rng.uniform(0.05, 0.2)), mask.shape)
    points = sample_points(mask, box, int(rng.integers(1, 4)), int(rng.integers(0, 5)), rng)
    return box[None], points.points[None], points.labels[None]


def _jitter(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mask shifted by a few pixels (an imperfect previous answer)."""
    moved = np.roll(mask, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
    return moved if moved.any() else mask


def train_shape_sam(
    path: Path, *, steps: int = 240, batch: int = 8, image_size: int = 256, seed: int = 0, log: bool = False
) -> Path:
    """Train the tiny SAM (module docstring) and save its state dict to ``path``.

    Runs single-threaded (the tiny model's many small operations are fastest that way,
    and it leaves the other cores to other tests); restores torch's thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sam = build_tiny_sam_architecture(image_size).train()
        pool = training_pool(160, rng)
        pairs = [(s, t) for s in pool for t in range(len(s) - 1) if s.masks[t].any()]
        optimizer = torch.optim.AdamW(sam.parameters(), lr=4e-3, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=4e-3, total_steps=steps, pct_start=0.1
        )
        start = time.perf_counter()
        for step in range(steps):
            chosen = [pairs[int(i)] for i in rng.choice(len(pairs), size=batch, replace=False)]
            binary_start = rng.random(batch) < 0.35  # a track's first step: no logits yet
            with torch.no_grad():
                previous = [
                    sam_input_tensor(sam, s.frames[t])[0] for (s, t), b in zip(chosen, binary_start) if not b
                ]
                prev_embeddings = iter(sam.image_encoder(torch.cat(previous))) if previous else iter(())
            inputs = [sam_input_tensor(sam, s.frames[t + 1]) for s, t in chosen]
            embeddings = sam.image_encoder(torch.cat([x for x, _ in inputs]))
            loss = torch.zeros(())
            ious = []
            for i, ((sequence, t), binary) in enumerate(zip(chosen, binary_start)):
                before, after = sequence.masks[t], sequence.masks[t + 1]
                encoding = SamImageEncoding(embeddings[i : i + 1], inputs[i][1], after.shape)
                if binary:
                    mask_input = mask_prompt_from_mask(sam, encoding, _jitter(before, rng))
                else:
                    with torch.no_grad():
                        prev = SamImageEncoding(next(prev_embeddings)[None], inputs[i][1], before.shape)
                        box, pts, lbl = _prompt(_jitter(before, rng), rng)
                        mask_input, _ = decode_low_res(
                            sam,
                            prev,
                            boxes=box,
                            points=pts,
                            point_labels=lbl,
                            mask_input=mask_prompt_from_mask(sam, prev, before),
                        )
                box, pts, lbl = _prompt(before, rng)
                logits, iou_pred = decode_low_res(
                    sam, encoding, boxes=box, points=pts, point_labels=lbl, mask_input=mask_input
                )
                target = _target(sam, encoding, after)
                prob = torch.sigmoid(logits)
                dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
                with torch.no_grad():
                    pred, truth = logits > 0, target > 0.5
                    union = (pred | truth).sum()
                    iou = (pred & truth).sum() / union if union > 0 else torch.tensor(1.0)
                loss = loss + F.binary_cross_entropy_with_logits(logits, target) + dice
                loss = loss + F.mse_loss(iou_pred.reshape(()), iou.float())
                ious.append(float(iou))
            optimizer.zero_grad()
            (loss / batch).backward()
            optimizer.step()
            schedule.step()
            if log and (step % 20 == 0 or step == steps - 1):
                print(
                    f"step {step}: loss {float(loss.detach()) / batch:.3f} IoU {np.mean(ious):.3f} {time.perf_counter() - start:.0f} s"
                )
        sam.eval()
        state = sam.state_dict()
        return atomic_write_stream(Path(path), lambda handle: torch.save(state, handle))
    finally:
        torch.set_num_threads(threads)
