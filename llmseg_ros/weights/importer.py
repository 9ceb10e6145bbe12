"""``llmseg import-weights``: the published LLM-Seg / LISA checkpoints → our weights directory.

Formats (``docs/weights_formats.md`` lists every key):

* ``llmseg-deepspeed``: an LLM-Seg release (DeepSpeed ZeRO-2 ``ckpt_model`` folder). It
  holds the whole peft-wrapped module: LLaVA-Lightning-7B-v1 with LoRA, the trained
  embeddings and LM head, ``text_hidden_fcs``, ``lisa_dino_conv``, the fusion layers and
  heads, and frozen copies of SAM ViT-H and torch-hub DINOv2 ViT-L/14. Needs ``--base``:
  the LLaVA-Lightning-7B-v1 folder the authors trained from (its ``config.json`` and
  tokenizer; no weights are read from it).
* ``lisa-hf``: a LISA release in Hugging Face format (``xinlai/LISA-7B-v1`` …): LLaVA v1
  with the LoRA merged, ``text_hidden_fcs`` and SAM ViT-H with the fine-tuned mask
  decoder; the CLIP vision tower is not in it (``--vision-tower``: the
  ``openai/clip-vit-large-patch14`` folder).

Output (``llmseg_ros.weights.directory`` format)::

    OUT/llmseg_weights.json   method, base_vlm "./vlm", the authors' prompt format ([SEG], llava_v1,
                              answer "[SEG]."), torch.hub DINOv2 interpolation, SAM sizing
    OUT/heads.safetensors     projection.*, selector.* + mask_proj.* (LLM-Seg) | mask_decoder.* (LISA)
    OUT/adapter/              the LoRA adapter (LLM-Seg; LISA's is merged into its weights)
    OUT/vlm/                  the base VLM as a transformers LlavaForConditionalGeneration
    OUT/import_report.json    every source tensor and what became of it

Every tensor of the source is accounted for: mapped, checked and dropped (recomputable
buffers; frozen copies of public weights, compared with the public files when given, else
listed as unverified), or the import stops with an error naming the keys it does not know
or misses. Tensors are streamed: memory-mapped in, written shard by shard (``shard_bytes``),
so a 7B / 13B checkpoint converts within a workstation's memory. The directory is written
under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmseg_ros.config import AUTHORS_PROMPT
from llmseg_ros.utils.atomic import atomic_directory
from llmseg_ros.weights.directory import ADAPTER_DIR, HEADS_NAME, WeightsManifest, write_manifest
from llmseg_ros.weights.import_plan import (
    DEFAULT_SHARD_BYTES,
    FORMATS,
    GROWN_ROWS,
    PROJECTOR_IDENTITY,
    REPORT_NAME,
    VLM_DIR,
    Disposition,
    ImportOptions,
    ImportPlan,
    clip_keys,
    plan_import,
)
from llmseg_ros.weights.llava_v1 import llava_processor

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "FORMATS",
    "REPORT_NAME",
    "ImportOptions",
    "ImportPlan",
    "import_weights",
    "plan_import",
    "write_import",
]


class ShardWriter:
    """Writes named tensors as numbered shards (``model-00001-of-00003.safetensors``, ...) of
    at most ``shard_bytes`` each."""

    def __init__(self, directory: Path, shard_bytes: int) -> None:
        self.directory = directory
        self.shard_bytes = shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        index = len(self._shards)
        save_file(
            self._pending, str(self.directory / f".shard-{index:05d}.safetensors"), metadata={"format": "pt"}
        )
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Name the shards ``model-i-of-n``, write the index; returns the tensor names written."""
        if self._pending:
            self._flush()
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.directory / f".shard-{i:05d}.safetensors").rename(self.directory / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2) + "\n", encoding="utf-8"
        )
        return list(weight_map)


def _vlm_tensor(plan: ImportPlan, entry: Disposition) -> torch.Tensor:
    tensor = plan.source.get(entry.key)
    if entry.target in GROWN_ROWS:  # one zero row for the <image> placeholder
        tensor = torch.cat([tensor, tensor.new_zeros((1, tensor.shape[1]))])
    expected = plan.expected[entry.target]
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{entry.key} is {tuple(tensor.shape)}; {entry.target} must be {expected}")
    return tensor


def _write_vlm(plan: ImportPlan, folder: Path, log: Callable[[str], None]) -> None:
    from transformers import GenerationConfig

    folder.mkdir()
    writer = ShardWriter(folder, plan.options.shard_bytes)
    dtype: torch.dtype | None = None
    for entry in plan.entries:
        if entry.kind == "vlm":
            tensor = _vlm_tensor(plan, entry)
            dtype = dtype or tensor.dtype
            writer.add(entry.target, tensor)
    if plan.vision is not None:
        for name, key in clip_keys(plan.vision).items():
            target = f"model.vision_tower.{name}"
            tensor = plan.vision.get(key)
            if tuple(tensor.shape) != plan.expected[target]:
                raise ValueError(
                    f"{key} of {plan.options.vision_tower} is {tuple(tensor.shape)}, expected {plan.expected[target]}"
                )
            writer.add(target, tensor)  # as published (the model's dtype is chosen when it loads)
    hidden = plan.spec.hidden_size
    dtype = dtype or torch.float32
    writer.add(PROJECTOR_IDENTITY[0], torch.eye(hidden, dtype=dtype))
    writer.add(PROJECTOR_IDENTITY[1], torch.zeros(hidden, dtype=dtype))
    written = set(writer.close())
    if written != set(plan.expected):
        raise RuntimeError(f"internal error: wrote {len(written)} VLM tensors, expected {len(plan.expected)}")
    plan.config.dtype = str(dtype).removeprefix("torch.")
    plan.config.save_pretrained(folder)
    tok = plan.tokenizer
    GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    ).save_pretrained(folder)
    llava_processor(tok, plan.spec).save_pretrained(folder)
    log(f"wrote the base VLM ({writer.total_bytes / 1e9:.2f} GB) to {folder}")


def _write_adapter(plan: ImportPlan, folder: Path) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file

    assert plan.lora_rank is not None
    folder.mkdir()
    tensors = {e.target: plan.source.get(e.key).contiguous() for e in plan.entries if e.kind == "adapter"}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    layers = int(plan.spec.text["num_hidden_layers"])
    modules = [
        f"model.language_model.layers.{i}.self_attn.{p}_proj" for i in range(layers) for p in ("q", "v")
    ]
    LoraConfig(
        r=plan.lora_rank,
        lora_alpha=plan.options.lora_alpha,
        lora_dropout=plan.options.lora_dropout,
        target_modules=modules,
        bias="none",
    ).save_pretrained(str(folder))
    meta = {
        "seg_token": AUTHORS_PROMPT.seg_token,
        "seg_token_id": int(plan.tokenizer.convert_tokens_to_ids(AUTHORS_PROMPT.seg_token)),
        "vocab_rows": int(plan.spec.text["vocab_size"]),
        "hidden_size": plan.spec.hidden_size,
        "base_model": f"./{VLM_DIR}",
    }
    (folder / "segvlm.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_heads(plan: ImportPlan, path: Path) -> dict[str, list[int]]:
    from safetensors.torch import save_file

    tensors = {e.target: plan.source.get(e.key).contiguous() for e in plan.entries if e.kind == "heads"}
    save_file(tensors, str(path), metadata={"format": "llmseg_ros.weights"})
    return {name: list(t.shape) for name, t in tensors.items()}


def _manifest(plan: ImportPlan, heads: dict[str, list[int]]) -> WeightsManifest:
    options = plan.options
    embed_dim = heads["projection.2.weight"][0]
    lora: dict[str, Any] = {}
    if plan.lora_rank is not None:
        lora = {
            "r": plan.lora_rank,
            "alpha": options.lora_alpha,
            "dropout": options.lora_dropout,
            "target_modules": ["q_proj", "v_proj"],
        }
    source = plan.source
    return WeightsManifest(
        method=plan.method,
        base_vlm=f"./{VLM_DIR}",
        hidden_size=plan.spec.hidden_size,
        embed_dim=embed_dim,
        dinov2=str(options.dinov2) if options.dinov2 is not None else "facebook/dinov2-large",
        sam_model_type="vit_h",
        lora=lora,
        adapter=plan.lora_rank is not None,
        prompt=AUTHORS_PROMPT,
        dinov2_pos_interpolation="hub",
        sam_downscale="truncate",
        mask_pooling="sam",
        extra={
            "imported_from": {
                "format": options.format,
                "source": source.description,
                "files": [p.name for p in source.files],
                **{k: v for k, v in source.info.items() if k in ("global_steps", "ds_version")},
            },
            "unverified": plan.notes,
        },
    )


def write_import(plan: ImportPlan, log: Callable[[str], None] = print) -> Path:
    """Write the weights directory of ``plan`` atomically; returns its path."""
    out = plan.options.out
    if out.exists() and not plan.options.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    with atomic_directory(out) as tmp:
        _write_vlm(plan, tmp / VLM_DIR, log)
        if plan.lora_rank is not None:
            _write_adapter(plan, tmp / ADAPTER_DIR)
        heads = _write_heads(plan, tmp / HEADS_NAME)
        report = {
            "summary": plan.summary(),
            "notes": plan.notes,
            "tensors": [
                {"key": e.key, "kind": e.kind, "target": e.target, "group": e.group, "note": e.note}
                for e in plan.entries
            ],
            "bookkeeping": plan.source.extras,
        }
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        write_manifest(tmp, _manifest(plan, heads))
    return out


def import_weights(options: ImportOptions, log: Callable[[str], None] = print) -> ImportPlan:
    """Plan (and unless ``options.dry_run``, write) an import; logs the summary and notes."""
    plan = plan_import(options)
    log(plan.summary())
    if options.dry_run:
        for line in plan.mapping():
            log(line)
    else:
        write_import(plan, log)
        log(f"weights written to {options.out}")
    for note in plan.notes:
        log(f"note: {note}")
    return plan
