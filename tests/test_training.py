"""Training loop on tiny random models (CPU): what moves, what stays frozen, exact resume, export.

The base models are the tiny LLaVA / DINOv2 / SAM of ``llmseg_ros.tiny`` (written once per
module); the data are synthetic scenes with oracle proposals in the proposal cache, plus
one source without a cache whose proposals come from the tiny SAM during training.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from training_setup import SYNTHETIC, build_setup, make_config

from llmseg_ros.data.synthetic import generate_split
from llmseg_ros.models.prompts import SEG_TOKEN
from llmseg_ros.tiny import TINY_EMBED_SIZE, TINY_PROPOSALS
from llmseg_ros.training.checkpoint import list_checkpoints
from llmseg_ros.training.config import DataSource, TrainConfig
from llmseg_ros.training.datamix import DataMix, rank_positions
from llmseg_ros.training.trainer import Trainer, warmup_decay

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Tiny base models, 4 synthetic training scenes, an oracle proposal cache with features."""
    return build_setup(tmp_path_factory.mktemp("training"), {"train": 4})


def test_warmup_decay_schedule() -> None:
    values = [warmup_decay(s, warmup_steps=2, max_steps=6) for s in range(8)]
    assert values == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert warmup_decay(0, 0, 4) == 1.0 and warmup_decay(3, 0, 4) == 0.25


def test_config_validation_fingerprint_and_shipped_configs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="source rate must be > 0"):
        DataSource(kind="jsonl", path="x.jsonl", rate=0)
    with pytest.raises(ValueError, match="source kind must be one of"):
        DataSource(kind="coco", path="x")
    with pytest.raises(ValueError, match=r"unknown training config field\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(warmup_steps=10, max_steps=10)
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match=r"method must be one of \['llmseg', 'lisa'\], got 'grounded'"):
        TrainConfig(method="grounded")
    with pytest.raises(ValueError, match="dice_weight must be >= 0"):
        TrainConfig(dice_weight=-1)
    config = TrainConfig.from_dict(
        {"sources": [{"kind": "jsonl", "path": "a.jsonl", "rate": 2}], "lora": {"r": 4}}
    )
    assert config.sources[0].name == "jsonl" and config.lora.r == 4
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.replace(output_dir="elsewhere", stop_after=3).fingerprint() == config.fingerprint()
    assert config.replace(lr=2e-4).fingerprint() != config.fingerprint()

    configs = sorted((REPO / "training" / "configs").glob("*.yaml"))
    shipped = {
        p.name: TrainConfig.from_file(p)
        for p in configs
        if not p.name.startswith(("accelerate", "segmenter"))
    }
    from llmseg_ros.config import SegmenterConfig

    assert SegmenterConfig.from_file(REPO / "training/configs/segmenter_llmseg.yaml").method == "llmseg"
    lisa_eval = SegmenterConfig.from_file(REPO / "training/configs/segmenter_lisa.yaml")
    assert lisa_eval.method == "lisa" and lisa_eval.weights_dir == "runs/lisa_reasonseg/weights"
    assert (
        json.loads((REPO / "training/configs/deepspeed_zero2.json").read_text())["zero_optimization"]["stage"]
        == 2
    )
    assert {
        "reasonseg_llmseg.yaml",
        "llmseg40k_finetune.yaml",
        "robot_finetune.yaml",
        "tiny_smoke.yaml",
    } <= set(shipped)
    paper = shipped["reasonseg_llmseg.yaml"]
    assert (paper.lr, paper.batch_size, paper.grad_accum, paper.max_steps, paper.precision) == (
        1e-4,
        1,
        10,
        5000,
        "bf16",
    )
    assert (paper.iou_weight, paper.iop_weight, paper.tau) == (1.0, 50.0, 0.05)
    finetune = shipped["llmseg40k_finetune.yaml"]
    assert (finetune.lr, finetune.max_steps, finetune.sources[0].kind) == (1e-5, 2500, "llmseg40k")
    assert finetune.init_weights == paper.output_dir + "/weights"
    lisa = shipped["reasonseg_lisa.yaml"]
    assert (lisa.method, lisa.lr, lisa.batch_size, lisa.grad_accum, lisa.bce_weight, lisa.dice_weight) == (
        "lisa",
        3e-4,
        2,
        10,
        2.0,
        0.5,
    )


def test_data_mix_is_stateless_and_follows_the_rates(setup: dict[str, object]) -> None:
    a = DataSource(kind="jsonl", path=str(setup["train"]), cache=str(setup["cache"]), rate=3, name="a")
    b = DataSource(kind="jsonl", path=str(setup["train"]), rate=1, name="b", instructions="first")
    mix = DataMix([a, b], seed=7)
    picks = [mix.choose(p)[0] for p in range(2000)]
    assert abs(np.mean(np.asarray(picks) == 0) - 0.75) < 0.04  # 3 : 1
    first, again = mix[11], DataMix([a, b], seed=7)[11]
    assert (first.source, first.sample.image_id, first.questions, first.answers) == (
        again.source,
        again.sample.image_id,
        again.questions,
        again.answers,
    )
    assert [mix.choose(p)[:2] for p in range(50)] != [
        DataMix([a, b], seed=8).choose(p)[:2] for p in range(50)
    ]
    for position in range(30):
        example = mix[position]
        [(question, answer)] = example.conversations  # one question per scene in this data
        assert answer.count(SEG_TOKEN) == 1
        assert any(text.rstrip("?.") in question for text in example.sample.instructions)
        if example.source == "a":
            assert example.proposals is not None and example.features is not None
            assert example.iou is not None and example.iou.shape == (1, len(example.proposals))
            assert example.iop is not None and example.iop.max() == 1.0  # whole target objects are proposals
        else:
            assert example.proposals is None and example.features is None
    with pytest.raises(ValueError, match="at least one data source"):
        DataMix([], seed=0)
    ranks = [list(zip(range(3), rank_positions(0, r, 2, 2))) for r in range(2)]
    assert [b for _, b in ranks[0]] == [[0, 1], [4, 5], [8, 9]]
    assert [b for _, b in ranks[1]] == [[2, 3], [6, 7], [10, 11]]
    assert next(rank_positions(5, 1, 2, 2)) == [22, 23]


def test_pooling_at_the_grid_equals_the_embedders_pooling(setup: dict[str, object]) -> None:
    from llmseg_ros.models.embeddings import MaskEmbedder
    from llmseg_ros.training.modules import pool_at_grid, upsample_matrix

    models = setup["models"]
    assert isinstance(models, dict)
    embedder = MaskEmbedder.load(models["dinov2"], input_size=TINY_EMBED_SIZE)
    image = np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8)
    masks = np.random.default_rng(1).random((4, 50, 90)) > 0.6
    masks[2] = False  # an empty proposal pools to zeros
    features = embedder.backbone_features(image)
    reference = embedder.pool(embedder.project(features), masks)
    fast = pool_at_grid(embedder, features, masks)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast[2], torch.zeros_like(fast[2]))
    x = torch.randn(3, 8, 8)
    a = upsample_matrix(8, 256)
    up = torch.nn.functional.interpolate(x[None], size=(256, 256), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(a @ x @ a.T, up, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="features must be"):
        pool_at_grid(embedder, features[:, :4], masks)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_step_moves_trainable_weights_only_and_export_loads_back(
    setup: dict[str, object], tmp_path: Path
) -> None:
    """Two sources: oracle cache with features, and one without cache (tiny SAM + DINOv2 on the fly)."""
    sources = [
        DataSource(kind="jsonl", path=str(setup["train"]), cache=str(setup["cache"]), name="cached"),
        DataSource(kind="jsonl", path=str(setup["train"]), name="online"),
    ]
    trainer = Trainer(
        make_config(setup, tmp_path / "run", sources=sources, max_steps=3, grad_accum=1, checkpoint_every=0),
        progress=False,
    )
    modules = trainer.modules
    assert trainer.modules.proposal_fn is not None
    vlm_before = snapshot(modules.seg_vlm.model)
    backbone_before = snapshot(modules.embedder.backbone)
    heads_before = {n: snapshot(getattr(modules, n)) for n in ("projection", "mask_proj", "selector")}
    trainable = set(modules.trainable_state())
    assert any(".lora_A." in n for n in trainable) and any(".lora_B." in n for n in trainable)
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    assert any("lm_head.modules_to_save" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)

    result = trainer.train()  # step 1 runs at lr 0 (warm-up), step 2 moves LoRA B, step 3 LoRA A
    assert result.finished and result.step == 3 and len(result.history) == 3
    assert {"loss", "lm", "iou", "iop", "lr"} <= set(result.history[0])
    for name, p in modules.seg_vlm.model.named_parameters():
        if f"vlm.{name}" in trainable:
            assert not torch.equal(p, vlm_before[name]), f"trainable {name} did not move"
        else:
            assert torch.equal(p, vlm_before[name]), f"frozen {name} moved"
    for name, p in modules.embedder.backbone.named_parameters():
        assert torch.equal(p, backbone_before[name]) and not p.requires_grad
    for module_name, before in heads_before.items():
        for name, p in getattr(modules, module_name).named_parameters():
            if re.search(r"(cross_attn_mask_to_query|final_attn)\.(q|k)_proj", name):
                # Attention onto the single query token: softmax over one key is 1 whatever q, k.
                assert torch.equal(p, before[name]), f"{module_name}.{name} has no gradient but moved"
            else:
                assert not torch.equal(p, before[name]), f"{module_name}.{name} did not move"

    # The export is what the pipeline loads: same heads, same adapter, same scores.
    from llmseg_ros.config import SegmenterConfig
    from llmseg_ros.pipeline import ReasonSegmenter
    from llmseg_ros.weights.directory import load_weights

    assert result.weights_dir is not None
    loaded = load_weights(result.weights_dir)
    assert loaded.manifest.method == "llmseg" and loaded.manifest.extra["steps"] == 3
    for key, module in (
        ("projection", modules.projection),
        ("selector", modules.selector),
        ("mask_proj", modules.mask_proj),
    ):
        state = module.state_dict()
        assert set(loaded.state_dicts[key]) == set(state)
        assert all(torch.equal(loaded.state_dicts[key][k], v) for k, v in state.items())
    models = setup["models"]
    assert isinstance(models, dict)
    segmenter = ReasonSegmenter(
        SegmenterConfig(
            sam_checkpoint=models["sam_checkpoint"],
            sam_model_type="tiny",
            dinov2=models["dinov2"],
            vlm=models["vlm"],
            weights_dir=str(result.weights_dir),
            device="cpu",
            dtype="float32",
            embed_size=TINY_EMBED_SIZE,
            proposals=TINY_PROPOSALS,
        )
    )
    image = generate_split("val", 1, seed=1, config=SYNTHETIC)[0].image
    frame = segmenter.prepare(image)
    answer = segmenter.segment(frame, "whatever has the colour of a banana")
    modules.eval()
    with torch.no_grad():
        hidden = modules.seg_vlm.seg_hidden(image, "whatever has the colour of a banana")
        query = modules.projection(hidden[None])[0]
        embedder = modules.embedder
        embeddings = embedder.pool(embedder.project(embedder.backbone_features(image)), frame.proposals.masks)
        similarity, iop = modules.selector.score(embeddings, query)
    np.testing.assert_allclose(answer.similarity, similarity.numpy(), atol=1e-5)
    np.testing.assert_allclose(answer.iop, iop.numpy(), atol=1e-5)


def trainable_equal(a: Trainer, b: Trainer) -> None:
    sa, sb = a.modules.trainable_state(), b.modules.trainable_state()
    assert set(sa) == set(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), f"{name} differs"


@pytest.mark.slow
def test_resume_reaches_the_same_weights_exactly(setup: dict[str, object], tmp_path: Path) -> None:
    uninterrupted = Trainer(make_config(setup, tmp_path / "a"), progress=False)
    full = uninterrupted.train()
    assert full.finished and full.step == 4

    stopped = Trainer(make_config(setup, tmp_path / "b", stop_after=2, keep_checkpoints=1), progress=False)
    first = stopped.train()
    assert not first.finished and first.step == 2 and first.weights_dir is None
    assert [s for s, _ in list_checkpoints(tmp_path / "b" / "checkpoints")] == [2]
    assert not list((tmp_path / "b" / "checkpoints").glob("*.tmp"))
    with pytest.raises(ValueError, match="different configuration"):
        Trainer(make_config(setup, tmp_path / "b", lr=5e-4), progress=False).maybe_resume()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(make_config(setup, tmp_path / "b", resume="never"), progress=False).maybe_resume()

    resumed = Trainer(make_config(setup, tmp_path / "b", keep_checkpoints=1), progress=False)
    second = resumed.train()
    assert second.resumed_from is not None and second.resumed_from.name == "step-00000002"
    assert second.finished and second.step == 4
    trainable_equal(uninterrupted, resumed)
    assert [s for s, _ in list_checkpoints(tmp_path / "b" / "checkpoints")] == [4]
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    for a_rec, b_rec in zip(full.history[2:], second.history):
        assert a_rec["loss"] == b_rec["loss"]

    from safetensors.torch import load_file

    assert full.weights_dir is not None and second.weights_dir is not None
    heads_a = load_file(str(full.weights_dir / "heads.safetensors"))
    heads_b = load_file(str(second.weights_dir / "heads.safetensors"))
    assert heads_a.keys() == heads_b.keys() and all(torch.equal(heads_a[k], heads_b[k]) for k in heads_a)
    adapter = "adapter/adapter_model.safetensors"
    ad_a, ad_b = load_file(str(full.weights_dir / adapter)), load_file(str(second.weights_dir / adapter))
    assert ad_a.keys() == ad_b.keys() and all(torch.equal(ad_a[k], ad_b[k]) for k in ad_a)

    # Fine-tuning from the export starts exactly where the first run ended.
    tuned = Trainer(make_config(setup, tmp_path / "c", init_weights=str(full.weights_dir)), progress=False)
    trainable_equal(uninterrupted, tuned)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"training_{name}", REPO / "training" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cli_tiny_profile_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """training/train.py with the shipped tiny_smoke config: tiny models, synthetic data, SAM on the fly."""
    script = _load_script("train")
    args = script.parse_args(
        [
            "--config",
            str(REPO / "training/configs/tiny_smoke.yaml"),
            "--output-dir",
            str(tmp_path / "run"),
            "--set",
            "lora.r=4",
            "--set",
            "max_steps=2",
            "--no-progress",
        ]
    )
    config = script.config_from_args(args)
    assert (config.profile, config.lora.r, config.max_steps, config.output_dir) == (
        "tiny",
        4,
        2,
        str(tmp_path / "run"),
    )
    with pytest.raises(ValueError, match="KEY=VALUE"):
        script.apply_override({}, "lr")
    assert (
        script.main(
            [
                *map(
                    str,
                    [
                        "--config",
                        REPO / "training/configs/tiny_smoke.yaml",
                        "--output-dir",
                        tmp_path / "run",
                        "--max-steps",
                        "2",
                        "--no-progress",
                    ],
                )
            ]
        )
        == 0
    )
    assert "finished 2 steps" in capsys.readouterr().out
    from llmseg_ros.weights.directory import load_weights

    weights = load_weights(tmp_path / "run" / "weights")
    assert weights.manifest.sam_model_type == "tiny" and weights.adapter_dir is not None
    assert (tmp_path / "run" / "synthetic" / "jsonl" / "train.jsonl").is_file()
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["profile"] == "tiny"


@pytest.mark.slow
def test_lisa_training_learns_keeps_sam_frozen_and_exports_for_the_pipeline(
    setup: dict[str, object], tmp_path: Path
) -> None:
    """method: lisa — same script and data; LM + 2·BCE + 0.5·Dice; SAM's encoders frozen."""
    from llmseg_ros.config import SegmenterConfig
    from llmseg_ros.models.sam_prompting import encode_image
    from llmseg_ros.pipeline import ReasonSegmenter
    from llmseg_ros.training.modules import LisaTrainModules
    from llmseg_ros.weights.directory import load_weights

    config = make_config(
        setup, tmp_path / "lisa", method="lisa", max_steps=12, grad_accum=1, batch_size=2, checkpoint_every=0
    )
    trainer = Trainer(config, progress=False)
    modules = trainer.modules
    assert isinstance(modules, LisaTrainModules)
    assert trainer.mix.caches == [None]  # LISA ignores the proposal cache
    trainable = set(modules.trainable_state())
    assert any(n.startswith("head.projection.") for n in trainable)
    assert any(n.startswith("head.mask_decoder.") for n in trainable)
    assert any(".lora_A." in n for n in trainable) and any("lm_head.modules_to_save" in n for n in trainable)
    sam = modules.head.sam
    assert not any(p.requires_grad for p in sam.parameters())
    sam_before = snapshot(sam)
    decoder_before = snapshot(modules.head.mask_decoder)

    fixed = trainer.prepare_batch([trainer.mix[p] for p in range(4)])
    with torch.no_grad():
        before = modules(fixed)
    assert before["total"].item() == pytest.approx(
        before["lm"].item() + 2.0 * before["bce"].item() + 0.5 * before["dice"].item(), rel=1e-5
    )
    result = trainer.train()
    assert result.finished and {"loss", "lm", "bce", "dice", "lr"} <= set(result.history[0])
    with torch.no_grad():
        after = modules(fixed)
    assert after["bce"].item() + after["dice"].item() < 0.8 * (before["bce"].item() + before["dice"].item())
    for name, p in sam.named_parameters():
        assert torch.equal(p, sam_before[name]), f"frozen SAM parameter {name} moved"
    still = sorted(
        {
            n.rsplit(".", 2)[0]
            for n, p in modules.head.mask_decoder.named_parameters()
            if torch.equal(p, decoder_before[n])
        }
    )
    # Single-mask output and no IoU loss (as in LISA): the IoU head and the hypernetworks of
    # the three multimask outputs get no gradient; everything else in the decoder moved.
    assert still == [
        "iou_prediction_head.layers",
        "output_hypernetworks_mlps.1.layers",
        "output_hypernetworks_mlps.2.layers",
        "output_hypernetworks_mlps.3.layers",
    ]

    assert result.weights_dir is not None
    loaded = load_weights(result.weights_dir)
    assert loaded.manifest.method == "lisa" and loaded.manifest.sam_model_type == "tiny"
    assert set(loaded.state_dicts) == {"projection", "mask_decoder"}
    for key, module in (("projection", modules.head.projection), ("mask_decoder", modules.head.mask_decoder)):
        assert all(torch.equal(loaded.state_dicts[key][k], v) for k, v in module.state_dict().items())

    with pytest.raises(ValueError, match="hold 'lisa' weights, not 'llmseg'"):
        Trainer(make_config(setup, tmp_path / "wrong", init_weights=str(result.weights_dir)), progress=False)
    again = Trainer(
        dataclasses.replace(config, init_weights=str(result.weights_dir), output_dir=str(tmp_path / "again")),
        progress=False,
    )
    assert isinstance(again.modules, LisaTrainModules)
    for name, p in again.modules.head.mask_decoder.state_dict().items():
        assert torch.equal(p, modules.head.mask_decoder.state_dict()[name])

    models = setup["models"]
    assert isinstance(models, dict)
    segmenter = ReasonSegmenter(
        SegmenterConfig(
            method="lisa",
            sam_checkpoint=models["sam_checkpoint"],
            sam_model_type="tiny",
            vlm=models["vlm"],
            weights_dir=str(result.weights_dir),
            device="cpu",
            dtype="float32",
        )
    )
    image = generate_split("val", 1, seed=1, config=SYNTHETIC)[0].image
    answer = segmenter.segment(segmenter.prepare(image), "whatever has the colour of a banana")
    modules.eval()
    with torch.no_grad():
        hidden = modules.seg_vlm.seg_hidden(image, "whatever has the colour of a banana")
        logits, iou = modules.head(encode_image(sam, image), hidden[None])
    np.testing.assert_array_equal(answer.mask, (logits[0] > 0).numpy())
    assert answer.confidence == pytest.approx(float(np.clip(iou[0].item(), 0.0, 1.0)), abs=1e-5)
