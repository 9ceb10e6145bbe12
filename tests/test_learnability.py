"""The whole training loop learns: tiny random models on the synthetic colour task, on CPU.

Setting (chosen so that a few minutes of CPU training are enough, every time):

* data: synthetic scenes (``llmseg_ros.data.synthetic``) with 2–3 flat shapes whose
  questions name the target only through its colour ("whatever has the colour of a ripe
  tomato"), phrases only, in our JSONL format; 160 training scenes, 48 held-out scenes;
* proposals: a tiny random SAM proposes nothing object-like, so the proposal cache is
  filled with *oracle* proposals — each object, its two halves, the union of all
  objects (``llmseg_ros.training.oracle``) — through the ordinary precompute path, with
  the tiny DINOv2's features. Everything downstream is the real code: mask embeddings,
  the ``<SEG>`` query of the tiny LLaVA, the selector, the losses, the export, and the
  inference method that loads the exported weights;
* model: the tiny LLaVA / DINOv2 of ``llmseg_ros.tiny``; its random attention has to learn
  to carry the instruction into the ``<SEG>`` state, so LoRA covers all four attention
  projections (r 16) and the query side trains at lr 1e-3 (the proposal side at 1e-4),
  with the inference prompt as the only template.

Assertions (held-out gIoU, the pipeline's default selection ``iop_threshold``): the trained
model beats the untrained one by more than 0.3 and always-pick-the-largest-proposal by
more than 0.15 (measured with seed 0: 0.680 vs 0.134 and 0.402).

Cost: about 80 s of one CPU core (78 CPU-seconds measured: 72 s user, 6 s system; the
700 training steps take 47 of them, each held-out evaluation 6). The test runs torch on
one thread: its tensors are too small to gain from a second one, and with two threads
spinning on a 2-core machine shared with other jobs (and CPU training's former
per-tensor AdamW) it took 17 CPU-minutes, 73 minutes of wall time; with one thread and
the fused AdamW the trainer now uses on CPU, the same machine, similarly loaded, took
3 min 51 s.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from training_setup import CachedProposals, method_from_weights

from llmseg_ros.config import LoraSettings
from llmseg_ros.data.jsonl import JsonlDataset, read_jsonl_records
from llmseg_ros.data.sample import Sample
from llmseg_ros.data.synthetic import SyntheticConfig, generate_split, write_synthetic_dataset
from llmseg_ros.methods.llmseg import LLMSegMethod
from llmseg_ros.training.cache import ProposalCache
from llmseg_ros.training.config import DataSource, TrainConfig
from llmseg_ros.training.modules import build_tiny_models
from llmseg_ros.training.oracle import OracleProposals
from llmseg_ros.training.precompute import precompute_cache

TASK = SyntheticConfig(image_size=112, min_objects=2, max_objects=3, families=("colour",), sentence_prob=0.0)
TRAIN_SCENES, VAL_SCENES = 160, 48
EMBED_SIZE = 112
STEPS = 700


def giou(samples: list[Sample], predict: Callable[[Sample], np.ndarray]) -> float:
    from llmseg_ros.evaluation.report import evaluate_samples

    summary, _ = evaluate_samples(samples, predict)
    return float(summary["giou"])


def train_and_score(tmp_path: Path) -> tuple[float, float, float, str]:
    """Train on the task; (trained, untrained, largest-proposal) held-out gIoU and a report."""
    from llmseg_ros.methods.base import SegmentRequest
    from llmseg_ros.models.embeddings import MaskEmbedder
    from llmseg_ros.training.trainer import Trainer

    models = build_tiny_models(tmp_path / "models")
    files = write_synthetic_dataset(
        tmp_path / "data", {"train": TRAIN_SCENES, "val": VAL_SCENES}, seed=0, config=TASK
    )
    scenes = generate_split("train", TRAIN_SCENES, seed=0, config=TASK) + generate_split(
        "val", VAL_SCENES, seed=0, config=TASK
    )
    oracle = OracleProposals(scenes)
    embedder = MaskEmbedder.load(models["dinov2"], input_size=EMBED_SIZE)
    for split in ("train", "val"):
        paths = sorted({str(r.image_path) for r in read_jsonl_records(files[split])})
        precompute_cache(
            paths,
            tmp_path / f"cache_{split}",
            oracle,
            features=lambda image: embedder.backbone_features(image).numpy(),
            feature_model=models["dinov2"],
            feature_input_size=EMBED_SIZE,
            shard_size=64,
            progress=False,
        )

    config = TrainConfig(
        sources=[
            DataSource(
                kind="jsonl",
                path=str(files["train"]),
                cache=str(tmp_path / "cache_train"),
                templates="inference",
            )
        ],
        vlm=models["vlm"],
        dinov2=models["dinov2"],
        embed_size=EMBED_SIZE,
        lora=LoraSettings(r=16, alpha=32, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
        lr=1e-3,
        head_lr=1e-4,
        warmup_steps=35,
        max_steps=STEPS,
        batch_size=1,
        grad_accum=1,
        iou_direction="gt_pred",
        checkpoint_every=0,
        log_every=50,
        output_dir=str(tmp_path / "run"),
        device="cpu",
        seed=0,
    )
    trainer = Trainer(config, progress=False)
    untrained_dir = trainer.export(tmp_path / "untrained")
    result = trainer.train()
    assert result.finished and result.weights_dir is not None

    val = list(JsonlDataset(files["val"]))
    generator = CachedProposals(ProposalCache(tmp_path / "cache_val"), val)

    def predictor(method: LLMSegMethod) -> Callable[[Sample], np.ndarray]:
        def predict(sample: Sample) -> np.ndarray:
            frame = method.prepare(sample.image)
            return method.segment(
                frame, SegmentRequest(sample.instruction, is_sentence=sample.is_sentence)
            ).mask

        return predict

    largest = giou(val, lambda s: generator.generate(s.image).masks[0])
    untrained = giou(val, predictor(method_from_weights(untrained_dir, models, generator, EMBED_SIZE)))
    trained = giou(val, predictor(method_from_weights(result.weights_dir, models, generator, EMBED_SIZE)))
    history = [(h["step"], round(h["iou"], 3), round(h["iop"], 4)) for h in result.history]
    message = (
        f"gIoU trained {trained:.3f}, untrained {untrained:.3f}, largest {largest:.3f}; losses {history}"
    )
    return trained, untrained, largest, message


@pytest.mark.slow
def test_training_learns_the_synthetic_task(tmp_path: Path) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and not slowed by other processes
    try:
        trained, untrained, largest, message = train_and_score(tmp_path)
    finally:
        torch.set_num_threads(threads)
    print(message)
    assert trained > untrained + 0.3, message
    assert trained > largest + 0.15, message
