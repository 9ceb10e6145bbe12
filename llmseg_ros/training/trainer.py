"""The LLM-Seg training loop (``training/train.py``), from one CPU to many GPUs.

One process per device (``accelerate launch``; a plain ``python`` call is one process);
``accelerate`` handles DDP or DeepSpeed ZeRO-2 (from its launch config), autocast
(bf16 / fp16) and gradient accumulation. Per optimizer step each process runs
``grad_accum`` micro-batches of ``batch_size`` examples from its own positions of the
data stream (:mod:`llmseg_ros.training.datamix`), so the effective batch is
``batch_size × grad_accum × processes`` (LLM-Seg: 1 × 10 × 2 GPUs).

Schedule: AdamW; learning rate warmed up linearly from 0 to ``lr`` over
``warmup_steps`` optimizer steps, then decayed linearly to 0 at ``max_steps``
(DeepSpeed's ``WarmupDecayLR`` with ``warmup_type: linear``, as LISA / LLM-Seg use).

Checkpoints (``OUTPUT_DIR/checkpoints/step-*``, :mod:`~llmseg_ros.training.checkpoint`)
hold the trainable parameters, optimizer, scheduler, every process's RNG states and the
data position; a run restarted with the same config continues from the newest one that
passes its integrity checks (an older one, with a warning, when the newest is damaged)
and reaches the same weights as an uninterrupted run. With a validation source
(``val_source``), the modules are scored every ``val_every`` steps and after the last
one (:mod:`~llmseg_ros.training.validation`), and the weights with the best gIoU so far
are exported to ``OUTPUT_DIR/weights_best``. The final weights are exported to
``OUTPUT_DIR/weights``, in the format :class:`llmseg_ros.pipeline.ReasonSegmenter` loads.
Losses go to ``OUTPUT_DIR/metrics.jsonl``, scores to ``OUTPUT_DIR/validation.jsonl``
(:mod:`~llmseg_ros.training.runlog`).

Order of the durable writes at a step: validation scores, then the best export, then the
checkpoint; a run killed anywhere in between resumes from the previous checkpoint and
redoes them with identical results.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmseg_ros.training.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    TrainState,
    find_checkpoint,
    list_checkpoints,
    restore_rng_state,
    save_checkpoint,
    write_run_config,
)
from llmseg_ros.training.config import TrainConfig
from llmseg_ros.training.datamix import DataMix, PositionBatches, TrainExample, collate_examples
from llmseg_ros.training.modules import SegTrainModules, TrainModules, apply_tiny_profile, build_train_modules
from llmseg_ros.training.runlog import RunLog
from llmseg_ros.utils.device import resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
VALIDATION_NAME = "validation.jsonl"
WEIGHTS_DIR = "weights"
BEST_WEIGHTS_DIR = "weights_best"


def warmup_decay(step: int, warmup_steps: int, max_steps: int) -> float:
    """Learning-rate factor after ``step`` optimizer steps: linear warm-up, then linear decay to 0.

    ``step / warmup_steps`` for ``step < warmup_steps``, then
    ``(max_steps - step) / (max_steps - warmup_steps)`` clipped at 0.
    """
    if step < warmup_steps:
        return step / warmup_steps
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → ``bf16`` on CUDA with bf16 support, ``fp16`` on other CUDA, ``no`` on CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` did.

    Attributes:
        step: optimizer steps done in total (over every invocation of the run).
        finished: whether ``max_steps`` was reached.
        weights_dir: the exported weights (``None`` when the run stopped early).
        checkpoint: the newest checkpoint written (``None`` if none).
        resumed_from: the checkpoint this invocation started from, if any.
        history: the logged metrics of this invocation.
        validations: the validation records of this invocation (``step``, ``n``, ``giou``,
            ``ciou``, ``nciou``, ``giou_1024``, ``seconds_per_query``, ``metric``, ``best``).
        best_weights_dir: ``OUTPUT_DIR/weights_best`` once a validation has run.
        best_score / best_step: the best validation score (``val_metric``) of the run so far and its step.
    """

    step: int
    finished: bool
    weights_dir: Path | None
    checkpoint: Path | None
    resumed_from: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    validations: list[dict[str, Any]] = field(default_factory=list)
    best_weights_dir: Path | None = None
    best_score: float | None = None
    best_step: int = 0


class Trainer:
    """Builds everything a run needs and trains (see the module docstring).

    Args:
        config: the run's configuration (``profile: tiny`` is applied here).
        progress: show a tqdm progress bar (main process only).
    """

    def __init__(self, config: TrainConfig, *, progress: bool = True) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        device = resolve_device(config.device)
        self.precision = resolve_precision(config.precision, device)
        self.accelerator = Accelerator(
            mixed_precision=self.precision,
            gradient_accumulation_steps=config.grad_accum,
            cpu=device.type == "cpu",
            step_scheduler_with_optimizer=False,
        )
        if config.profile == "tiny":
            with self.accelerator.main_process_first():  # one process writes the tiny models and data
                config = apply_tiny_profile(config)
        if not config.sources:
            raise ValueError(
                "no data sources: set 'sources' in the config (or use profile 'tiny' for synthetic data)"
            )
        self.config = config
        self.progress = progress
        self.device = self.accelerator.device
        self.output_dir = Path(config.output_dir)
        self.checkpoint_root = self.output_dir / CHECKPOINT_DIR
        set_seed(config.seed)

        self.mix = DataMix(
            config.sources,
            config.seed,
            with_proposals=config.method == "llmseg",
            ignore_pixels=config.ignore_pixels,
        )
        dtype = resolve_dtype(config.vlm_dtype, self.device)
        uncached_val = config.val_source is not None and not config.val_source.cache_dirs
        self.modules: SegTrainModules = build_train_modules(
            config,
            self.device,
            dtype,
            need_proposals=config.method == "llmseg"
            and (any(c is None for c in self.mix.caches) or uncached_val),
        )
        if isinstance(self.modules, TrainModules):
            self._check_feature_caches(self.modules)
        if self.precision != "no":
            # Master weights of the trained parameters in float32; autocast computes in half.
            for param in self.modules.parameters():
                if param.requires_grad and param.dtype != torch.float32:
                    param.data = param.data.float()
        params = list(self.modules.trainable_state().values())
        if not params:
            raise RuntimeError("nothing to train: no parameter requires a gradient")
        head_lr = config.lr if config.head_lr is None else config.head_lr
        named = self.modules.trainable_state()
        mask_side = self.modules.mask_side  # at head_lr; the query side follows lr
        groups = [
            {"params": [p for n, p in named.items() if not n.startswith(mask_side)], "lr": config.lr},
            {"params": [p for n, p in named.items() if n.startswith(mask_side)], "lr": head_lr},
        ]
        # On CPU, torch's fused AdamW is one pass over each tensor (about 9x faster than the
        # per-tensor default for the selector's 5M parameters); on CUDA torch picks its default.
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            betas=config.betas,
            eps=config.eps,
            weight_decay=config.weight_decay,
            **({"fused": True} if self.device.type == "cpu" else {}),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_decay(s, config.warmup_steps, config.max_steps)
        )
        self._configure_deepspeed()
        self.model, self.optimizer = self.accelerator.prepare(self.modules, optimizer)
        self.params = params
        self.state = TrainState(world_size=self.accelerator.num_processes, fingerprint=config.fingerprint())
        self.resumed_from: Path | None = None
        self.metrics_log = RunLog(self.output_dir / METRICS_NAME)
        self.validation_log = RunLog(self.output_dir / VALIDATION_NAME)
        self.validator = None
        if config.val_source is not None:
            from accelerate.utils import gather_object

            from llmseg_ros.training.validation import Validator

            self.validator = Validator(
                config.val_source,
                limit=config.val_limit,
                selection=config.val_selection,
                proposal_fn=getattr(self.modules, "proposal_fn", None),
                rank=self.accelerator.process_index,
                world_size=self.accelerator.num_processes,
                gather=gather_object if self.accelerator.num_processes > 1 else None,
                autocast=self.accelerator.autocast,
            )

    # -- setup helpers ---------------------------------------------------------------
    @property
    def is_deepspeed(self) -> bool:
        from accelerate.utils import DistributedType

        return bool(self.accelerator.distributed_type == DistributedType.DEEPSPEED)

    def _configure_deepspeed(self) -> None:
        if not self.is_deepspeed:
            return
        plugin = self.accelerator.state.deepspeed_plugin
        ds_config = plugin.deepspeed_config
        if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds_config["train_micro_batch_size_per_gpu"] = self.config.batch_size
        if ds_config.get("gradient_clipping", "auto") == "auto":
            ds_config["gradient_clipping"] = self.config.max_grad_norm or 0.0

    def _check_feature_caches(self, modules: TrainModules) -> None:
        embedder = modules.embedder
        expected = (embedder.hidden_size, embedder.grid_size, embedder.grid_size)
        for source, cache_set in zip(self.config.sources, self.mix.caches):
            if cache_set is None:
                continue
            for cache in cache_set.caches:
                spec = cache.manifest.features
                if spec is None:
                    continue
                if tuple(spec.shape) != expected or spec.input_size != self.config.embed_size:
                    raise ValueError(
                        f"proposal cache {cache.directory} of source {source.name!r} holds features of shape "
                        f"{tuple(spec.shape)} at {spec.input_size} px, but {self.config.dinov2!r} at "
                        f"{self.config.embed_size} px gives {expected}; rebuild the cache or drop its features"
                    )
                if spec.pos_interpolation != embedder.pos_interpolation:
                    raise ValueError(
                        f"proposal cache {cache.directory} of source {source.name!r} holds features made with "
                        f"the {spec.pos_interpolation!r} position-embedding resampling, but training (and "
                        f"inference) uses {embedder.pos_interpolation!r}; rebuild the cache with "
                        "training/precompute.py --features or drop its features"
                    )

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def unwrapped(self) -> SegTrainModules:
        module = self.accelerator.unwrap_model(self.model)
        assert isinstance(module, SegTrainModules)
        return module

    # -- resume ----------------------------------------------------------------------
    def maybe_resume(self) -> Path | None:
        """Continue from the newest intact checkpoint (``resume: auto``); returns it, or ``None``.

        A damaged newest checkpoint (truncated, altered or not in this version's format)
        is skipped with a warning in favour of the previous one.

        Raises:
            CheckpointError: (a ``ValueError``) ``resume: never`` over existing
                checkpoints, a checkpoint of a run with another configuration, or
                checkpoints of which none is intact.
            ValueError: the checkpoint's parameters do not fit the model.
        """
        if not list_checkpoints(self.checkpoint_root):
            return None
        if self.config.resume == "never":
            raise CheckpointError(
                f"{self.output_dir} already holds checkpoints ({self.checkpoint_root}); "
                "use another output_dir or resume: auto"
            )
        loaded, problems = find_checkpoint(self.checkpoint_root, rank=self.accelerator.process_index)
        for problem in problems:
            logger.warning("skipping a damaged checkpoint: %s", problem)
        if loaded is None:
            raise CheckpointError(
                f"none of the checkpoints in {self.checkpoint_root} can be resumed from: "
                + "; ".join(problems)
                + ". Delete them to start over, or use another output_dir"
            )
        path = loaded.path
        if problems:
            logger.warning("resuming from %s instead", path)
        if loaded.state.fingerprint != self.state.fingerprint:
            raise CheckpointError(
                f"checkpoint {path} was written by a run with a different configuration (fingerprint "
                f"{loaded.state.fingerprint}, now {self.state.fingerprint}); only run-control fields "
                "(output_dir, checkpoint_every, keep_checkpoints, log_every, num_workers, resume, stop_after) may change"
            )
        module = self.unwrapped()
        live = module.trainable_state()
        if set(live) != set(loaded.trainable):
            missing = sorted(set(live) - set(loaded.trainable))[:5]
            extra = sorted(set(loaded.trainable) - set(live))[:5]
            raise ValueError(
                f"checkpoint {path} does not match the trainable parameters (missing {missing}, extra {extra})"
            )
        for name, param in live.items():
            if loaded.trainable[name].shape != param.shape:
                raise ValueError(
                    f"checkpoint {path}: {name} has shape {tuple(loaded.trainable[name].shape)}, "
                    f"the model's is {tuple(param.shape)}"
                )
        with torch.no_grad():
            for name, param in live.items():
                param.copy_(loaded.trainable[name].to(param.device, param.dtype))
        if self.is_deepspeed:
            self.model.load_checkpoint(
                str(path / "engine"), tag="engine", load_module_strict=False, load_lr_scheduler_states=False
            )
        elif loaded.optimizer_state is not None:
            self.optimizer.load_state_dict(loaded.optimizer_state)
        else:
            raise CheckpointError(f"checkpoint {path} holds no optimizer state (optimizer.pt)")
        self.scheduler.load_state_dict(loaded.scheduler_state)
        if loaded.state.world_size != self.accelerator.num_processes:
            logger.warning(
                "checkpoint %s was written by %d processes, resuming with %d: the data order differs from an "
                "uninterrupted run",
                path,
                loaded.state.world_size,
                self.accelerator.num_processes,
            )
            self.state.micro_step = loaded.state.step * self.config.grad_accum
        else:
            self.state.micro_step = loaded.state.micro_step
        self.state.step = loaded.state.step
        self.state.best_score = loaded.state.best_score
        self.state.best_step = loaded.state.best_step
        if loaded.rng is not None:
            restore_rng_state(loaded.rng)
        self.resumed_from = path
        return path

    def _truncate_logs(self, step: int) -> None:
        """Cut the run's logs back to ``step`` (a torn last line goes too); main process only."""
        if self.is_main:
            self.metrics_log.truncate(step)
            self.validation_log.truncate(step)

    # -- data ------------------------------------------------------------------------
    def _loader(self) -> Any:
        batches = PositionBatches(
            self.state.micro_step,
            self.accelerator.process_index,
            self.accelerator.num_processes,
            self.config.batch_size,
        )
        # A private generator: building the iterator must not draw from the global RNG.
        generator = torch.Generator().manual_seed(self.config.seed)
        loader = torch.utils.data.DataLoader(
            self.mix,
            batch_sampler=batches,
            collate_fn=collate_examples,
            num_workers=self.config.num_workers,
            generator=generator,
            persistent_workers=False,
        )
        return iter(loader)

    def prepare_batch(self, examples: list[TrainExample]) -> Any:
        """The method's batch for ``examples`` (proposals, features, SAM encodings, targets)."""
        return self.unwrapped().prepare_batch(examples, self.device)

    # -- checkpoints and export ------------------------------------------------------
    def save_checkpoint(self) -> Path:
        module = self.unwrapped()
        engine_save = None
        if self.is_deepspeed:
            model = self.model

            def engine_save(folder: Path) -> None:
                model.save_checkpoint(str(folder), tag="engine", exclude_frozen_parameters=True)

        return save_checkpoint(
            self.checkpoint_root,
            self.state,
            trainable=module.trainable_state(),
            optimizer_state=None if self.is_deepspeed else self.optimizer.state_dict(),
            scheduler_state=self.scheduler.state_dict(),
            rank=self.accelerator.process_index,
            barrier=self.accelerator.wait_for_everyone,
            engine_save=engine_save,
            keep=self.config.keep_checkpoints,
        )

    def export(self, directory: Path | None = None, *, validation: dict[str, Any] | None = None) -> Path:
        """Write the trained weights (``llmseg_ros.weights.directory`` format); main process only writes.

        ``validation``: the scores these weights got, stored in the manifest's ``extra``.
        """
        from llmseg_ros.weights.directory import WeightsManifest, save_weights

        directory = directory or self.output_dir / WEIGHTS_DIR
        module = self.unwrapped()
        config = self.config
        if self.is_main:
            lora = config.lora
            fields: dict[str, Any] = {
                "dinov2": config.dinov2,
                "embed_size": config.embed_size,
                "sam_model_type": config.sam_model_type,
                # how the weights are queried: the prompt format they were trained with
                "prompt": module.seg_vlm.prompt,
                **module.manifest_fields(),
            }
            embedder = getattr(module, "embedder", None)
            if embedder is not None:  # the DINOv2 position embeddings the heads were trained on
                fields["dinov2_pos_interpolation"] = embedder.pos_interpolation
            manifest = WeightsManifest(
                method=module.method,
                base_vlm=config.vlm,
                hidden_size=module.seg_vlm.hidden_size,
                **fields,
                lora={
                    "r": lora.r,
                    "alpha": lora.alpha,
                    "dropout": lora.dropout,
                    "target_modules": list(lora.target_modules),
                },
                extra={
                    "steps": self.state.step,
                    "seed": config.seed,
                    "fingerprint": config.fingerprint(),
                    "sources": [{"name": s.name, "kind": s.kind, "rate": s.rate} for s in config.sources],
                    "profile": config.profile,
                    **({"validation": validation} if validation is not None else {}),
                },
            )
            save_weights(directory, manifest, module.export_modules(), vlm=module.seg_vlm)
        self.accelerator.wait_for_everyone()
        return directory

    # -- the loop --------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.metrics_log.append(record)
        terms = " ".join(f"{name} {record[name]:.4f}" for name in self.modules.loss_names)
        logger.info(
            "step %d lr %.3g loss %.4f (%s) %.2f s/step",
            record["step"],
            record["lr"],
            record["loss"],
            terms,
            record["seconds_per_step"],
        )

    def validate(self) -> dict[str, Any]:
        """Score the modules on the validation source; export ``weights_best`` when ``val_metric`` improves.

        Every process calls it (each scores its share of the samples). The record is
        appended to ``validation.jsonl`` and returned.

        Raises:
            RuntimeError: the run has no ``val_source``.
        """
        if self.validator is None:
            raise RuntimeError("no val_source is configured, nothing to validate on")
        summary, _ = self.validator.run(self.unwrapped())
        score = float(summary[self.config.val_metric])
        best = self.state.best_score is None or score > self.state.best_score
        record = {"step": self.state.step, **summary, "metric": self.config.val_metric, "best": best}
        if best:
            self.state.best_score, self.state.best_step = score, self.state.step
            scores = {
                k: v for k, v in record.items() if k not in ("seconds_per_query", "best")
            }  # reproducible
            self.export(self.output_dir / BEST_WEIGHTS_DIR, validation=scores)
        if self.is_main:
            self.validation_log.append(record)
        logger.info(
            "validation at step %d: gIoU %.4f cIoU %.4f over %d samples; %s %.4f%s",
            self.state.step,
            summary["giou"],
            summary["ciou"],
            summary["n"],
            self.config.val_metric,
            score,
            " (best so far)"
            if best
            else f" (best {self.state.best_score:.4f} at step {self.state.best_step})",
        )
        return record

    def _validates_at(self, step: int) -> bool:
        if self.validator is None:
            return False
        every = self.config.val_every
        return step == self.config.max_steps or bool(every and step % every == 0)

    def train(self) -> TrainResult:
        """Run (or continue) training until ``max_steps`` or ``stop_after`` optimizer steps."""
        from tqdm import tqdm

        config = self.config
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_run_config(self.output_dir, config.to_dict())
        self.accelerator.wait_for_everyone()
        self.maybe_resume()
        self._truncate_logs(self.state.step)  # a fresh run starts fresh logs
        target = config.max_steps if config.stop_after is None else min(config.max_steps, config.stop_after)
        history: list[dict[str, Any]] = []
        validations: list[dict[str, Any]] = []
        checkpoint: Path | None = self.resumed_from
        self.model.train()
        batches = self._loader() if self.state.step < target else None
        bar = tqdm(
            total=target,
            initial=self.state.step,
            desc="train",
            unit="step",
            disable=not (self.progress and self.is_main),
        )
        sums = dict.fromkeys(("loss", *self.modules.loss_names), 0.0)
        window_steps, window_start = 0, time.perf_counter()
        try:
            while self.state.step < target:
                assert batches is not None
                for _ in range(config.grad_accum):
                    batch = self.prepare_batch(next(batches))
                    with self.accelerator.accumulate(self.model):
                        losses = self.model(batch)
                        losses = {k: v if k == "total" else v.detach() for k, v in losses.items()}
                        if not torch.isfinite(losses["total"]):
                            raise FloatingPointError(
                                f"non-finite loss at step {self.state.step}: "
                                + ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
                            )
                        self.accelerator.backward(losses["total"])
                        if self.accelerator.sync_gradients and config.max_grad_norm:
                            self.accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    self.state.micro_step += 1
                    sums["loss"] += losses["total"].item() / config.grad_accum
                    for key in self.modules.loss_names:
                        sums[key] += losses[key].item() / config.grad_accum
                lr = self.scheduler.get_last_lr()[0]  # the rate this step used
                if not self.accelerator.optimizer_step_was_skipped:
                    self.scheduler.step()
                self.state.step += 1
                window_steps += 1
                bar.update(1)
                if self.state.step % config.log_every == 0 or self.state.step == target:
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "step": self.state.step,
                        "lr": lr,
                        **{k: v / window_steps for k, v in sums.items()},
                        "seconds_per_step": elapsed / window_steps,
                    }
                    history.append(record)
                    self._log(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                    sums = dict.fromkeys(sums, 0.0)
                    window_steps, window_start = 0, time.perf_counter()
                validated = self._validates_at(self.state.step)
                if validated:
                    validations.append(self.validate())
                periodic = config.checkpoint_every and self.state.step % config.checkpoint_every == 0
                if periodic or validated or self.state.step == target:
                    checkpoint = self.save_checkpoint()
        finally:
            bar.close()
            batches = None  # shuts DataLoader workers down
        finished = self.state.step >= config.max_steps
        weights = self.export() if finished else None
        return TrainResult(
            step=self.state.step,
            finished=finished,
            weights_dir=weights,
            checkpoint=checkpoint,
            resumed_from=self.resumed_from,
            history=history,
            validations=validations,
            best_weights_dir=self.output_dir / BEST_WEIGHTS_DIR
            if self.state.best_score is not None
            else None,
            best_score=self.state.best_score,
            best_step=self.state.best_step,
        )


def train(config: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Build a :class:`Trainer` for ``config`` and run it."""
    return Trainer(config, progress=progress).train()


def parameter_summary(modules: SegTrainModules) -> dict[str, int]:
    """Trainable parameter counts per top-level submodule (``vlm``, ``projection``, ...)."""
    counts: dict[str, int] = {}
    for name, param in modules.named_parameters():
        if param.requires_grad:
            top = name.split(".", 1)[0]
            counts[top] = counts.get(top, 0) + param.numel()
    return counts
