"""Training as the authors trained (issue 14 §3), on tiny random models (CPU).

* the reproduction configs' data lists, validation schedule and loss settings;
* up to 3 questions per drawn image, each its own conversation, all supervised in one step
  with the released code's averaging (LLM-Seg: per image, then over images; LISA: over masks);
* pixels labelled 255 as background in the IoU / IoP targets and LISA's mask loss;
* the new ``<SEG>`` rows drawn as the authors' ``resize_token_embeddings`` drew them;
* validation during training, with the best-gIoU and the last weights exported.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from training_setup import build_setup, make_config

from llmseg_ros.config import LoraSettings
from llmseg_ros.data.jsonl import JsonlDataset, read_jsonl_records
from llmseg_ros.models.losses import (
    dice_loss,
    iop_loss,
    iou_kl_loss,
    lisa_mask_loss,
    proposal_targets,
    sigmoid_bce_loss,
)
from llmseg_ros.training.config import DataSource, TrainConfig
from llmseg_ros.training.datamix import DataMix
from llmseg_ros.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
AUTHORS_SEM_SEG = ["ade20k", "cocostuff", "pascal_part", "paco_lvis", "mapillary"]
AUTHORS_REFER_SEG = ["refclef", "refcoco", "refcoco+", "refcocog"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Tiny models; 4 training and 3 validation scenes with 3 questions each; oracle caches."""
    return build_setup(tmp_path_factory.mktemp("fidelity"), {"train": 4, "val": 3}, questions=3)


# -- configs -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["reasonseg_llmseg.yaml", "reasonseg_lisa.yaml"])
def test_reproduction_configs_use_the_released_data_lists_and_settings(name: str) -> None:
    path = REPO / "training" / "configs" / name
    assert "partimagenet" not in path.read_text(encoding="utf-8").lower()
    config = TrainConfig.from_file(path)
    by_group: dict[str, list[tuple[str, float]]] = {}
    for source in config.sources:
        group = Path(source.path).parent.name if source.kind == "jsonl" else source.kind
        by_group.setdefault(group, []).append((source.name, source.rate))
        assert (source.draw, source.questions, source.instructions) == ("image", 3, "random")
    # sem_seg / refer_seg / reason_seg at 9 / 3 / 1, each dataset equally often in its group
    assert by_group["sem_seg"] == [(n, pytest.approx(9 / 5)) for n in AUTHORS_SEM_SEG]
    assert by_group["refer_seg"] == [(n, pytest.approx(3 / 4)) for n in AUTHORS_REFER_SEG]
    assert by_group["reasonseg"] == [("reason_seg", 1)]
    assert (config.ignore_pixels, config.seg_init) == ("background", "normal")
    assert config.val_source is not None and config.val_every == 500
    assert (config.val_source.kind, config.val_source.split) == ("reasonseg", "val")
    assert config.val_selection.strategy == "iop_threshold" and config.val_selection.iop_threshold == 0.5
    # LLM-Seg's validate_threshold scores masks resized to 1024 x 1024; LISA's validate does not
    assert config.val_metric == ("giou_1024" if config.method == "llmseg" else "giou")
    finetune = TrainConfig.from_file(REPO / "training/configs/llmseg40k_finetune.yaml")
    assert [s.draw for s in finetune.sources] == ["question"]  # one pair per draw, as finetune_llmseg.py
    assert finetune.val_source is not None and finetune.val_source.kind == "llmseg40k"
    assert finetune.val_metric == "giou_1024"


def test_config_validation_of_the_new_fields() -> None:
    assert (TrainConfig().ignore_pixels, TrainConfig().seg_init) == ("background", "normal")
    assert DataSource(kind="jsonl", path="a.jsonl").questions == 3
    with pytest.raises(ValueError, match="source questions must be an integer >= 1, got 0"):
        DataSource(kind="jsonl", path="a.jsonl", questions=0)
    with pytest.raises(ValueError, match=r"source draw must be one of \['image', 'question'\]"):
        DataSource(kind="jsonl", path="a.jsonl", draw="scene")
    with pytest.raises(ValueError, match=r"ignore_pixels must be one of \['background', 'exclude'\]"):
        TrainConfig(ignore_pixels="ignore")
    with pytest.raises(ValueError, match="val_every is 5 but no val_source is set"):
        TrainConfig(val_every=5)
    config = TrainConfig.from_dict(
        {"val_source": {"kind": "reasonseg", "path": "data/ReasonSeg", "split": "val"}, "val_every": 10}
    )
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.replace(val_every=20).fingerprint() != config.fingerprint()


# -- questions per image -----------------------------------------------------------------


def _masks_by_question(path: str) -> dict[tuple[str, str], np.ndarray]:
    return {(str(s.image_path), s.instruction): s.mask for s in JsonlDataset(path)}


def test_draws_up_to_three_questions_of_one_image(setup: dict[str, object]) -> None:
    train = str(setup["train"])
    masks = _masks_by_question(train)
    per_image: dict[str, set[str]] = {}
    for record in read_jsonl_records(Path(train)):
        per_image.setdefault(str(record.image_path), set()).add(record.question)
    assert all(len(q) == 3 for q in per_image.values())

    source = DataSource(kind="jsonl", path=train, cache=str(setup["cache_train"]), name="sem")
    mix = DataMix([source], seed=5)
    subsets = set()
    for position in range(12):
        example = mix[position]
        assert len(example.questions) == len(example.answers) == len(example.targets) == 3
        assert len(set(example.instructions)) == 3
        assert set(example.instructions) == per_image[str(example.sample.image_path)]
        for text, target, question in zip(example.instructions, example.targets, example.questions):
            np.testing.assert_array_equal(target, masks[(str(example.sample.image_path), text)])
            assert text.rstrip("?.") in question or text.lower().rstrip("?.") in question
        assert example.proposals is not None and example.iou is not None and example.iop is not None
        assert example.iou.shape == example.iop.shape == (3, len(example.proposals))
        for row, target in enumerate(example.targets):
            iou, iop = proposal_targets(example.proposals.masks, target, "background")
            np.testing.assert_array_equal(example.iou[row], iou)
            np.testing.assert_array_equal(example.iop[row], iop)
        subsets.add(tuple(sorted(example.instructions)))

    two = DataMix([DataSource(kind="jsonl", path=train, questions=2)], seed=5)
    drawn = [tuple(two[p].instructions) for p in range(20)]
    assert all(len(d) == 2 and len(set(d)) == 2 for d in drawn)
    assert len({frozenset(d) for d in drawn}) > 3  # different subsets of an image's questions
    single = DataMix([DataSource(kind="jsonl", path=train, draw="question")], seed=5)
    assert all(len(single[p].questions) == 1 for p in range(10))

    # ReasonSeg layout: one image per file, its paraphrases are its questions (one target)
    root = Path(str(setup["data"])) / "reasonseg"
    paraphrases = DataMix([DataSource(kind="reasonseg", path=str(root), split="train")], seed=5)
    example = paraphrases[0]
    assert len(example.questions) == min(3, len(example.sample.instructions))
    assert set(example.instructions) <= set(example.sample.instructions)
    assert all(np.array_equal(t, example.sample.mask) for t in example.targets)
    first = DataMix(
        [DataSource(kind="reasonseg", path=str(root), split="train", instructions="first")], seed=5
    )
    assert first[0].instructions == [first[0].sample.instruction]


@pytest.fixture(scope="module")
def trainer(setup: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    """An LLM-Seg trainer drawing 3 questions per image, no dropout (deterministic forward)."""
    config = make_config(
        setup,
        tmp_path_factory.mktemp("fidelity_run"),
        sources=[
            DataSource(kind="jsonl", path=str(setup["train"]), cache=str(setup["cache_train"]), name="sem")
        ],
        lora=LoraSettings(dropout=0.0),
    )
    return Trainer(config, progress=False)


def test_one_step_supervises_every_question_as_the_released_code(trainer: Trainer) -> None:
    modules = trainer.modules
    examples = [trainer.mix[0], trainer.mix[1]]
    batch = trainer.prepare_batch(examples)
    assert len(batch.conversations) == 6 and batch.image_index.tolist() == [0, 0, 0, 1, 1, 1]
    with torch.no_grad():
        losses = modules(batch)

        # reference: every conversation on its own, then the released code's averaging
        images = [e.image for e in examples for _ in e.questions]
        conversations = [pair for e in examples for pair in e.conversations]
        lm, hidden, _ = modules.seg_vlm.training_forward(images, conversations)
        assert losses["lm"].item() == pytest.approx(lm.item(), rel=1e-5)  # token mean over all 6
        queries = modules.projection(hidden)
        per_image_iou, per_image_iop = [], []
        row = 0
        for b, example in enumerate(examples):
            embeddings, _ = modules.mask_embeddings([batch.features[b]], [batch.masks[b]])
            rounds_iou, rounds_iop = [], []
            for q in range(len(example.questions)):
                out = modules.selector(embeddings, queries[row : row + 1])
                iou_gt = torch.from_numpy(example.iou[q])[None]
                iop_gt = torch.from_numpy(example.iop[q])[None]
                rounds_iou.append(iou_kl_loss(out.similarity, iou_gt, tau=0.05, direction="gt_pred"))
                rounds_iop.append(iop_loss(out.iop, iop_gt))
                row += 1
            per_image_iou.append(torch.stack(rounds_iou).mean())
            per_image_iop.append(torch.stack(rounds_iop).mean())
    assert losses["iou"].item() == pytest.approx(torch.stack(per_image_iou).mean().item(), rel=1e-4)
    assert losses["iop"].item() == pytest.approx(torch.stack(per_image_iop).mean().item(), rel=1e-4)


def test_lisa_mask_loss_averages_over_every_question(trainer: Trainer, setup: dict[str, object]) -> None:
    from llmseg_ros.models.heads import LisaMaskHead
    from llmseg_ros.models.sam import build_sam
    from llmseg_ros.models.sam_prompting import encode_image
    from llmseg_ros.training.modules import LisaTrainModules

    models = setup["models"]
    assert isinstance(models, dict)
    torch.manual_seed(0)
    sam = build_sam("tiny", models["sam_checkpoint"], torch.device("cpu"))
    vlm = trainer.modules.seg_vlm
    lisa = LisaTrainModules(vlm, LisaMaskHead(sam, vlm.hidden_size))
    examples = [trainer.mix[2], trainer.mix[3]]
    batch = lisa.prepare_batch(examples, torch.device("cpu"))
    assert len(batch.gt_masks) == len(batch.conversations) == 6
    with torch.no_grad():
        losses = lisa(batch)
        images = [e.image for e in examples for _ in e.questions]
        _, hidden, _ = vlm.training_forward(images, [p for e in examples for p in e.conversations])
        bce, dice = [], []
        row = 0
        for example in examples:
            encoding = encode_image(sam, example.image)
            for target in example.targets:
                logits, _ = lisa.head(encoding, hidden[row : row + 1])
                terms = lisa_mask_loss(logits, torch.from_numpy(target)[None], ignore_pixels="background")
                bce.append(terms["bce"])
                dice.append(terms["dice"])
                row += 1
    assert losses["bce"].item() == pytest.approx(torch.stack(bce).mean().item(), rel=1e-5)
    assert losses["dice"].item() == pytest.approx(torch.stack(dice).mean().item(), rel=1e-5)


# -- ignore pixels -----------------------------------------------------------------------


def _released_targets(proposals: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LLM-Seg's ``compute_all_iou`` / ``compute_all_iop`` on the sampled mask ``(mask == 1)``."""
    g = gt == 1
    inter = np.array([(p & g).sum() for p in proposals], dtype=np.float64)
    union = np.array([(p | g).sum() for p in proposals], dtype=np.float64)
    area = proposals.reshape(len(proposals), -1).sum(1).astype(np.float64)
    return inter / union, inter / area


def test_ignore_pixels_count_as_background_as_in_the_released_code(
    setup: dict[str, object], tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    gt = (rng.random((24, 32)) > 0.6).astype(np.uint8)
    gt[10:14] = 255  # an ignore band
    proposals = rng.random((6, 24, 32)) > 0.5
    proposals[0] = gt == 1
    iou, iop = proposal_targets(proposals, gt, "background")
    ref_iou, ref_iop = _released_targets(proposals, gt)
    np.testing.assert_allclose(iou, ref_iou, rtol=1e-6)
    np.testing.assert_allclose(iop, ref_iop, rtol=1e-6)
    excluded, _ = proposal_targets(proposals, gt, "exclude")
    assert not np.allclose(excluded, iou)

    logits = torch.from_numpy(rng.normal(size=(1, 24, 32)).astype(np.float32))
    target = torch.from_numpy(gt)[None]
    released = lisa_mask_loss(logits, target, ignore_pixels="background")
    truth = (target == 1).float()
    assert released["bce"].item() == pytest.approx(sigmoid_bce_loss(logits, truth).item(), rel=1e-6)
    assert released["dice"].item() == pytest.approx(dice_loss(logits, truth).item(), rel=1e-6)
    assert lisa_mask_loss(logits, target, ignore_pixels="exclude")["bce"].item() != pytest.approx(
        released["bce"].item()
    )
    with pytest.raises(ValueError, match="ignore_pixels must be one of"):
        proposal_targets(proposals, gt, "ignore")

    # through the data mix: a JSONL mask with an ignore band, targets per the setting
    from llmseg_ros.data.io import write_image
    from llmseg_ros.data.jsonl import write_jsonl

    record = read_jsonl_records(Path(str(setup["train"])))[0]
    sample = JsonlDataset(str(setup["train"]))[0]
    banded = sample.mask.copy()
    banded[: banded.shape[0] // 3] = 255
    write_image(tmp_path / "banded.png", banded)
    path = write_jsonl(
        tmp_path / "banded.jsonl",
        [
            {
                "image": str(record.image_path),
                "question": record.question,
                "mask": str(tmp_path / "banded.png"),
            }
        ],
    )
    source = DataSource(kind="jsonl", path=str(path), cache=str(setup["cache_train"]))
    for mode in ("background", "exclude"):
        example = DataMix([source], seed=0, ignore_pixels=mode)[0]
        assert example.proposals is not None and example.iou is not None
        expected, _ = proposal_targets(example.proposals.masks, banded, mode)
        np.testing.assert_array_equal(example.iou[0], expected)
    assert TrainConfig().ignore_pixels == "background"


# -- the <SEG> rows ----------------------------------------------------------------------


def _seg_rows(modules) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    vlm = modules.seg_vlm
    embedding = vlm.model.get_input_embeddings()
    head = vlm.model.get_output_embeddings()
    trainable_embedding = embedding.modules_to_save["default"].weight
    trainable_head = head.modules_to_save["default"].weight
    assert torch.equal(
        embedding.original_module.weight[vlm.seg_token_id], trainable_embedding[vlm.seg_token_id]
    )
    assert torch.equal(head.original_module.weight[vlm.seg_token_id], trainable_head[vlm.seg_token_id])
    return (
        trainable_embedding[vlm.seg_token_id].detach(),
        trainable_head[vlm.seg_token_id].detach(),
        trainable_embedding.detach(),
    )


def test_seg_rows_start_as_the_authors_resize_drew_them(trainer: Trainer, setup: dict[str, object]) -> None:
    """LISA / LLM-Seg ran ``resize_token_embeddings`` under transformers 4.31 / 4.29: the new
    rows came from the model's ``_init_weights``, N(0, initializer_range²), not from the mean
    of the old rows (what transformers ≥ 4.46 does by default)."""
    from llmseg_ros.training.modules import build_train_modules

    modules = trainer.modules
    base = modules.seg_vlm.model.get_base_model()
    reference = torch.nn.Embedding(20000, modules.seg_vlm.hidden_size)
    torch.manual_seed(0)
    base._init_weights(reference)  # transformers' own init of a fresh vocabulary row
    sigma = float(reference.weight.detach().std())
    assert sigma == pytest.approx(0.02, rel=0.02)

    embedding_row, head_row, table = _seg_rows(modules)
    n = embedding_row.numel()
    for row in (embedding_row, head_row):
        assert float(row.std()) == pytest.approx(sigma, rel=0.3)
        assert abs(float(row.mean())) < 4 * sigma / n**0.5
    old_mean = table[: modules.seg_vlm.seg_token_id].mean(0)
    assert float((embedding_row - old_mean).norm()) > 0.5 * sigma * n**0.5  # not the mean row
    assert not torch.allclose(embedding_row, head_row)  # independent draws

    # deterministic per seed; ``seg_init: mean`` keeps the mean row SegVLM.load writes
    config = trainer.config
    again = build_train_modules(config, torch.device("cpu"), torch.float32, need_proposals=False)
    assert torch.equal(_seg_rows(again)[0], embedding_row)
    mean = build_train_modules(
        config.replace(seg_init="mean"), torch.device("cpu"), torch.float32, need_proposals=False
    )
    mean_row, _, mean_table = _seg_rows(mean)
    torch.testing.assert_close(mean_row, mean_table[: mean.seg_vlm.seg_token_id].mean(0))


# -- validation during training -----------------------------------------------------------


@pytest.mark.slow
def test_validation_keeps_the_best_and_the_last_weights(setup: dict[str, object], tmp_path: Path) -> None:
    from llmseg_ros.evaluation.report import evaluate_samples
    from llmseg_ros.weights.directory import load_weights

    val = DataSource(kind="jsonl", path=str(setup["val"]), cache=str(setup["cache_val"]), name="val")
    config = make_config(
        setup,
        tmp_path / "run",
        val_source=val,
        val_every=2,
        val_limit=4,
        grad_accum=1,
        checkpoint_every=0,
        lr=5e-3,
    )
    trainer = Trainer(config, progress=False)
    result = trainer.train()
    assert result.finished and [v["step"] for v in result.validations] == [2, 4]
    log = [json.loads(line) for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and all(r["n"] == 4 for r in log)
    scores = [r["giou"] for r in log]
    best = int(np.argmax(scores))  # the first maximum: a tie does not replace the best
    assert (result.best_step, result.best_score) == (log[best]["step"], scores[best])
    assert [r["best"] for r in log] == [True, scores[1] > scores[0]]

    assert result.best_weights_dir is not None and result.weights_dir is not None
    best_weights = load_weights(result.best_weights_dir)
    assert best_weights.manifest.extra["steps"] == result.best_step
    assert best_weights.manifest.extra["validation"]["giou"] == result.best_score
    assert "seconds_per_query" not in best_weights.manifest.extra["validation"]  # reproducible export
    assert load_weights(result.weights_dir).manifest.extra["steps"] == 4

    # the recorded score is what the exported best weights get through the inference method
    from test_learnability import CachedProposals, method_from_weights

    from llmseg_ros.methods.base import SegmentRequest
    from llmseg_ros.training.cache import ProposalCache

    models = setup["models"]
    assert isinstance(models, dict)
    samples = list(JsonlDataset(str(setup["val"])))[:4]
    method = method_from_weights(
        result.best_weights_dir, models, CachedProposals(ProposalCache(setup["cache_val"]), samples)
    )

    def predict(sample):
        frame = method.prepare(sample.image)
        return method.segment(frame, SegmentRequest(sample.instruction, is_sentence=sample.is_sentence)).mask

    summary, _ = evaluate_samples(samples, predict)
    assert summary["giou"] == pytest.approx(result.best_score, abs=1e-6)

    # validating changes nothing in training
    plain = Trainer(
        make_config(setup, tmp_path / "plain", grad_accum=1, checkpoint_every=0, lr=5e-3), progress=False
    )
    plain.train()
    for name, value in trainer.modules.trainable_state().items():
        assert torch.equal(value, plain.modules.trainable_state()[name]), name

    # strictly greater replaces the best; a tie or a drop does not
    scripted = iter([result.best_score, result.best_score + 0.1])
    trainer.validator.run = lambda modules: ({"n": 4, "giou": next(scripted), "ciou": 0.0, "nciou": 0.0}, [])  # type: ignore[union-attr]
    trainer.state.step = 5
    assert trainer.validate()["best"] is False
    assert load_weights(result.best_weights_dir).manifest.extra["steps"] == result.best_step
    trainer.state.step = 6
    assert trainer.validate()["best"] is True
    assert load_weights(result.best_weights_dir).manifest.extra["steps"] == 6


def test_validator_scores_the_live_modules_with_the_evaluator(
    trainer: Trainer, setup: dict[str, object]
) -> None:
    from llmseg_ros.training.validation import Validator

    val = DataSource(kind="jsonl", path=str(setup["val"]), cache=str(setup["cache_val"]), name="val")
    validator = Validator(val, limit=4)
    modules = trainer.modules
    modules.train()
    torch.manual_seed(11)
    expected_next = torch.rand(3)
    torch.manual_seed(11)
    summary, records = validator.run(modules)
    assert modules.training and torch.equal(torch.rand(3), expected_next)  # no RNG drawn
    assert summary["n"] == len(records) == 4
    assert summary["giou"] == pytest.approx(np.mean([r.iou for r in records]))
    # LLM-Seg's selection score: per-sample IoU of masks nearest-resized to 1024 x 1024
    rescored = [
        1.0
        if r.metrics.normalized_union == 0
        else r.metrics.normalized_intersection / (r.metrics.normalized_union + 1e-5)
        for r in records
    ]
    assert summary["giou_1024"] == pytest.approx(float(np.mean(rescored)))
    halves = [Validator(val, limit=4, rank=r, world_size=2) for r in range(2)]
    shards = [h.run(modules)[1] for h in halves]
    assert sorted(r.sample_id for s in shards for r in s) == sorted(r.sample_id for r in records)
    assert {r.sample_id: r.iou for s in shards for r in s} == pytest.approx(
        {r.sample_id: r.iou for r in records}
    )
