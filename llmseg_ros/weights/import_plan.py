"""The plan of an import: every tensor of a published checkpoint classified, checked and
mapped, before anything is written (``llmseg import-weights --dry-run`` prints it).

See :mod:`llmseg_ros.weights.importer` for the formats and the output; the key rules are in
:mod:`llmseg_ros.weights.schema`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmseg_ros.weights.llava_v1 import (
    CLIP_VISION_PREFIX,
    BaseVLMSpec,
    clip_config_from_folder,
    expected_tensors,
    llava_config,
    prepare_tokenizer,
    text_config,
    vision_config,
)
from llmseg_ros.weights.schema import (
    LISA_RULES,
    LLMSEG_RULES,
    PEFT_PREFIX,
    KeyRule,
    classify,
    dinov2_hf_names,
)
from llmseg_ros.weights.sources import TensorSource, open_deepspeed, open_hf, read_json_object
from llmseg_ros.weights.torch_files import read_state_dict

FORMATS = ("llmseg-deepspeed", "lisa-hf")
VLM_DIR = "vlm"
REPORT_NAME = "import_report.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3
PROJECTOR_IDENTITY = (
    "model.multi_modal_projector.linear_2.weight",
    "model.multi_modal_projector.linear_2.bias",
)
GROWN_ROWS = ("model.language_model.embed_tokens.weight", "lm_head.weight")


@dataclass
class ImportOptions:
    """What to import and how (``llmseg import-weights`` arguments).

    Attributes:
        format: ``llmseg-deepspeed`` or ``lisa-hf``.
        source: the checkpoint (DeepSpeed ``ckpt_model`` folder / ``global_stepN`` folder /
            ``mp_rank_00_model_states.pt``; or the Hugging Face folder).
        out: the weights directory to write.
        base: LLM-Seg: the LLaVA-Lightning-7B-v1 folder (``config.json`` + tokenizer).
        vision_tower: a CLIP folder (``openai/clip-vit-large-patch14``); required for LISA,
            optional for LLM-Seg (its config then replaces the ViT-L/14 defaults).
        sam: the public SAM ViT-H checkpoint; when given, the checkpoint's frozen SAM copy
            is compared with it.
        dinov2: the public DINOv2 (``facebook/dinov2-large`` folder); when given, LLM-Seg's
            frozen torch-hub copy is compared with it, and the manifest names it.
        lora_alpha, lora_dropout: the LoRA settings the checkpoint was trained with (the
            rank is read off the tensors; alpha cannot be, the authors used 16).
        shard_bytes: largest VLM shard written at once (bounds memory).
        overwrite: replace an existing ``out``.
        dry_run: only plan and report.
    """

    format: str
    source: Path
    out: Path
    base: Path | None = None
    vision_tower: Path | None = None
    sam: Path | None = None
    dinov2: Path | None = None
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    shard_bytes: int = DEFAULT_SHARD_BYTES
    overwrite: bool = False
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {list(FORMATS)}, got {self.format!r}")
        for name in ("source", "out", "base", "vision_tower", "sam", "dinov2"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value).expanduser())
        if self.format == "llmseg-deepspeed" and self.base is None:
            raise ValueError(
                "--base is required for llmseg-deepspeed: the LLaVA-Lightning-7B-v1 folder the checkpoint was "
                "trained from (its config.json and tokenizer files)"
            )
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, int) or self.lora_alpha < 1:
            raise ValueError(f"lora_alpha must be a positive integer, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.shard_bytes < 1:
            raise ValueError(f"shard_bytes must be >= 1, got {self.shard_bytes}")


@dataclass
class Disposition:
    """What becomes of one source tensor.

    Attributes:
        key: the tensor's name in the checkpoint.
        kind: ``vlm`` | ``adapter`` | ``heads`` | ``derived`` | ``frozen``.
        target: where it goes (or what it is, for dropped tensors).
        group: what the tensor is.
        note: for dropped tensors, how it was checked.
    """

    key: str
    kind: str
    target: str
    group: str
    note: str = ""

    def line(self) -> str:
        verb = {"derived": "dropped (recomputed)", "frozen": "dropped (frozen public weights)"}.get(self.kind)
        where = f"{self.kind}: {self.target}" if verb is None else verb
        return f"{self.key} -> {where}" + (f" [{self.note}]" if self.note else "")


@dataclass
class ImportPlan:
    """The checked mapping of a checkpoint (built by :func:`plan_import`, written by :func:`write_import`)."""

    options: ImportOptions
    source: TensorSource
    prefix: str
    entries: list[Disposition]
    spec: BaseVLMSpec
    tokenizer: Any
    config: Any
    expected: dict[str, tuple[int, ...]]
    vision: TensorSource | None  # CLIP from --vision-tower (when the checkpoint has none)
    lora_rank: int | None
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return "llmseg" if self.options.format == "llmseg-deepspeed" else "lisa"

    def counts(self) -> dict[str, int]:
        return dict(Counter(e.kind for e in self.entries))

    def summary(self) -> str:
        counts = self.counts()
        parts = [f"{counts.get(k, 0)} {k}" for k in ("vlm", "adapter", "heads", "derived", "frozen")]
        return f"{len(self.entries)} tensors from {self.source.description}: " + ", ".join(parts)

    def mapping(self) -> list[str]:
        """One line per source tensor, then the synthesised and borrowed ones."""
        lines = [e.line() for e in self.entries]
        lines += [f"(identity) -> vlm: {name}" for name in PROJECTOR_IDENTITY]
        lines += [f"(zero row for {self.spec.image_token_id}, <image>) -> vlm: {name}" for name in GROWN_ROWS]
        if self.vision is not None:
            lines += [
                f"{key} ({self.options.vision_tower}) -> vlm: model.vision_tower.{name}"
                for name, key in clip_keys(self.vision).items()
            ]
        lines += [f"{name}: {value}" for name, value in sorted(self.source.extras.items())]
        return lines


_CLIP_PARTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")


def clip_keys(vision: TensorSource) -> dict[str, str]:
    """CLIP vision-tower tensors of a CLIP folder: our name below ``model.vision_tower.`` → the
    folder's key (``vision_model.*`` in hub checkpoints, unprefixed in newer saves; the text
    tower and projections of a full CLIP checkpoint are not used)."""
    found: dict[str, str] = {}
    for key in vision:
        name = key.removeprefix("vision_model.")
        if name.startswith(_CLIP_PARTS) and not name.endswith("position_ids"):
            if name in found:
                raise ValueError(f"{vision.description}: {key} and {found[name]} are the same CLIP tensor")
            found[name] = key
    return found


def _strip_prefix(source: TensorSource, fmt: str) -> str:
    keys = source.keys()
    if fmt != "llmseg-deepspeed":
        return ""
    wrapped = [k.startswith(PEFT_PREFIX) for k in keys]
    if all(wrapped):
        return PEFT_PREFIX
    if not any(wrapped):
        return ""
    odd = [k for k, w in zip(keys, wrapped) if not w][:5]
    raise ValueError(
        f"{source.description}: mixes peft-wrapped ('{PEFT_PREFIX}…') and plain keys, e.g. {odd}"
    )


def _short(items: list[str], limit: int = 12) -> str:
    return ", ".join(items[:limit]) + (f", … ({len(items)} in all)" if len(items) > limit else "")


def _classify_all(
    source: TensorSource, prefix: str, rules: tuple[KeyRule, ...], fmt: str
) -> list[Disposition]:
    entries: list[Disposition] = []
    unknown: list[str] = []
    for key in source:
        found = classify(key[len(prefix) :], rules)
        if found is None:
            unknown.append(key)
            continue
        rule, target = found
        entries.append(Disposition(key, rule.kind, target, rule.group))
    if unknown:
        raise ValueError(
            f"{source.description}: {len(unknown)} tensor(s) match no key of the {fmt} format: {_short(unknown)}. "
            "This is not an unchanged authors' checkpoint of that format (see docs/weights_formats.md)"
        )
    return entries


def _check_derived(plan_source: TensorSource, entries: list[Disposition], spec: BaseVLMSpec) -> None:
    head_dim = spec.hidden_size // int(spec.text["num_attention_heads"])
    theta = float(spec.text["rope_theta"])
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    for entry in entries:
        if entry.kind != "derived":
            continue
        tensor = plan_source.get(entry.key)
        if entry.target.startswith("rotary"):
            expected = inv_freq.to(tensor.dtype)
            tol = 2 * torch.finfo(tensor.dtype).eps if tensor.is_floating_point() else 0.0
            ok = tensor.shape == expected.shape and torch.allclose(
                tensor.float(), expected.float(), rtol=tol, atol=0
            )
        else:
            n = tensor.shape[-1] if tensor.ndim else 0
            ok = tensor.ndim == 2 and torch.equal(tensor, torch.arange(n, dtype=tensor.dtype).expand(1, -1))
        if not ok:
            raise ValueError(
                f"{entry.key} does not hold the standard {entry.group} values; this checkpoint is not the authors'"
            )
        entry.note = "equal to the recomputed values"


def _verify_frozen(
    source: TensorSource,
    entries: list[Disposition],
    kind: str,
    public: Path | None,
    reference: Callable[[Path], Callable[[str], torch.Tensor | None]],
    unverified: str,
    notes: list[str],
) -> None:
    """Compare the frozen ``kind`` copies (``"sam"`` / ``"dinov2"``) with the ``public`` weights.

    ``reference(public)`` gives a lookup from the copy's name to the public tensor (``None``
    when absent); equal after casting to the copy's dtype = verified, else ``ValueError``.
    Without ``public`` the tensors are marked unverified and ``unverified`` is noted.
    """
    frozen = [e for e in entries if e.kind == "frozen" and e.target.startswith(f"{kind}:")]
    if not frozen:
        return
    if public is None:
        for e in frozen:
            e.note = "not verified"
        notes.append(f"{len(frozen)} {unverified}")
        return
    lookup = reference(public)
    for e in frozen:
        name = e.target[len(kind) + 1 :]
        ref = lookup(name)
        tensor = source.get(e.key)
        if (
            ref is None
            or ref.numel() != tensor.numel()
            or not torch.equal(ref.reshape(tensor.shape).to(tensor.dtype), tensor)
        ):
            label = {"sam": "SAM", "dinov2": "DINOv2"}[kind]
            raise ValueError(
                f"{e.key} differs from {name!r} of {public}: the checkpoint's {label} is not that public {label}; "
                "it cannot be dropped (pass the weights the model was trained with)"
            )
        e.note = f"equal to {public.name}"


def _public_sam(path: Path) -> Callable[[str], torch.Tensor | None]:
    return read_state_dict(path, unwrap="model").get


def _public_dinov2(path: Path) -> Callable[[str], torch.Tensor | None]:
    public = open_hf(path)

    def lookup(hub_key: str) -> torch.Tensor | None:
        names = dinov2_hf_names(hub_key)
        if names is None or any(n not in public for n in names):
            return None
        return torch.cat([public.get(n) for n in names]) if len(names) > 1 else public.get(names[0])

    return lookup


def _check_heads(entries: list[Disposition], method: str) -> None:
    targets = {e.target for e in entries if e.kind == "heads"}
    projection = {f"projection.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    expected = set(projection)
    if method == "llmseg":
        depth = 1 + max(
            (int(m.group(1)) for t in targets if (m := re.match(r"selector\.layers\.(\d+)\.", t))), default=-1
        )
        attn = [f"{a}_proj.{p}" for a in ("q", "k", "v", "out") for p in ("weight", "bias")]
        wb = ("weight", "bias")
        expected |= {f"mask_proj.{p}" for p in wb}
        for d in range(max(depth, 2)):
            layer = f"selector.layers.{d}"
            for block in ("self_attn", "cross_attn_mask_to_query", "cross_attn_query_to_mask"):
                expected |= {f"{layer}.{block}.{a}" for a in attn}
            expected |= {f"{layer}.norm{i}.{p}" for i in range(1, 5) for p in wb}
            expected |= {f"{layer}.mlp.lin{i}.{p}" for i in (1, 2) for p in wb}
        expected |= {f"selector.final_attn.{a}" for a in attn} | {f"selector.norm_final.{p}" for p in wb}
        expected |= {f"selector.{h}.{i}.{p}" for h in ("iou_head", "iop_head") for i in (0, 2) for p in wb}
    missing = sorted(expected - targets)
    if method == "lisa" and not any(t.startswith("mask_decoder.") for t in targets):
        missing.append("mask_decoder.* (model.visual_model.mask_decoder.*)")
    if missing:
        raise ValueError(f"the checkpoint lacks trained head tensors (our names): {_short(missing)}")


def _lora_rank(entries: list[Disposition], source: TensorSource, layers: int) -> int | None:
    lora = {e.target: e.key for e in entries if e.kind == "adapter"}
    if not lora:
        return None
    expected = {
        f"base_model.model.model.language_model.layers.{i}.self_attn.{p}_proj.lora_{ab}.weight"
        for i in range(layers)
        for p in ("q", "v")
        for ab in ("A", "B")
    }
    missing = sorted(expected - set(lora))
    if missing:
        raise ValueError(f"the checkpoint's LoRA is incomplete: no tensors for {_short(missing)}")
    ranks = {source.shape(k)[0] for t, k in lora.items() if ".lora_A." in t}
    if len(ranks) != 1:
        raise ValueError(f"the LoRA ranks differ between layers: {sorted(ranks)}")
    return ranks.pop()


def _open_source(options: ImportOptions) -> TensorSource:
    if options.format == "llmseg-deepspeed":
        return open_deepspeed(options.source)
    return open_hf(options.source)


def plan_import(options: ImportOptions) -> ImportPlan:
    """Read and check the checkpoint; map every tensor (no output written).

    Raises:
        FileNotFoundError: a source folder / file is missing.
        ValueError: unknown or missing keys, a config or tokenizer that does not fit the
            tensors, a frozen copy that differs from the public file given, unreadable files.
    """
    source = _open_source(options)
    prefix = _strip_prefix(source, options.format)
    rules = LLMSEG_RULES if options.format == "llmseg-deepspeed" else LISA_RULES
    entries = _classify_all(source, prefix, rules, options.format)
    base_dir = options.base if options.format == "llmseg-deepspeed" else options.source
    assert base_dir is not None  # ImportOptions requires --base for DeepSpeed
    base_config = read_json_object(base_dir / "config.json")
    config_name = str(base_dir / "config.json")
    text = text_config(base_config, source, prefix, config_name)
    select_layer = base_config.get("mm_vision_select_layer", -2)
    if isinstance(select_layer, bool) or not isinstance(select_layer, int):
        raise ValueError(f"{config_name}: 'mm_vision_select_layer' must be an integer, got {select_layer!r}")
    feature = base_config.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise ValueError(
            f"{config_name}: mm_vision_select_feature {feature!r} is not supported (LLaVA v1 uses 'patch')"
        )
    if options.format == "lisa-hf" and base_config.get("mm_use_im_start_end") is False:
        raise ValueError(
            f"{config_name}: mm_use_im_start_end is false; the authors' checkpoints use <im_start>/<im_end>"
        )
    has_clip = any(e.target.startswith("model.vision_tower.") for e in entries)
    vision: TensorSource | None = None
    given = clip_config_from_folder(options.vision_tower) if options.vision_tower is not None else None
    if has_clip:
        vision_args = vision_config(source, prefix + CLIP_VISION_PREFIX, given)
    else:
        if options.vision_tower is None:
            raise ValueError(
                "the checkpoint holds no CLIP vision tower (LISA's release leaves it out): pass --vision-tower, "
                "the openai/clip-vit-large-patch14 folder"
            )
        vision = open_hf(options.vision_tower)
        clip = clip_keys(vision)
        if not clip:
            raise ValueError(f"{options.vision_tower} holds no CLIP vision-tower tensors (vision_model.*)")
        vision_prefix = "vision_model." if next(iter(clip.values())).startswith("vision_model.") else ""
        vision_args = vision_config(vision, vision_prefix, given)
    spec = BaseVLMSpec(
        text=text, vision=vision_args, select_layer=select_layer, source_rows=int(text["source_rows"])
    )
    tokenizer = prepare_tokenizer(
        base_dir, spec.source_rows, add_authors_tokens=options.format == "llmseg-deepspeed"
    )
    config = llava_config(spec, tokenizer)
    expected = expected_tensors(config)

    targets = [e.target for e in entries if e.kind == "vlm"]
    if vision is not None:
        targets += [f"model.vision_tower.{name}" for name in clip_keys(vision)]
    targets += list(PROJECTOR_IDENTITY)
    unexpected = sorted(set(targets) - set(expected))
    missing = sorted(set(expected) - set(targets))
    if unexpected or missing:
        problems = []
        if missing:
            problems.append(f"no tensors for {_short(missing)}")
        if unexpected:
            problems.append(f"tensors the converted model has no place for: {_short(unexpected)}")
        raise ValueError(f"{source.description} does not make a complete LLaVA: " + "; ".join(problems))

    _check_heads(entries, "llmseg" if options.format == "llmseg-deepspeed" else "lisa")
    lora_rank = _lora_rank(entries, source, int(text["num_hidden_layers"]))
    notes: list[str] = []
    _check_derived(source, entries, spec)
    _verify_frozen(
        source,
        entries,
        "sam",
        options.sam,
        _public_sam,
        "frozen SAM tensors were dropped unverified: run the imported weights with the public SAM ViT-H "
        "checkpoint (sam_vit_h_4b8939.pth, `llmseg fetch-weights`), which the authors froze; pass --sam to compare",
        notes,
    )
    _verify_frozen(
        source,
        entries,
        "dinov2",
        options.dinov2,
        _public_dinov2,
        "frozen DINOv2 tensors (torch.hub dinov2_vitl14) were dropped unverified: run with facebook/dinov2-large "
        "(the same weights in transformers' layout); pass --dinov2 to compare",
        notes,
    )
    return ImportPlan(
        options, source, prefix, entries, spec, tokenizer, config, expected, vision, lora_rank, notes
    )
