"""The published LLM-Seg and LISA checkpoints, by name: where to download them, what they
need, and which published figure each should reproduce.

``llmseg fetch-weights --released NAME`` downloads a checkpoint (only the files the
import reads: DeepSpeed's ``mp_rank_00_model_states.pt`` and ``latest``, not the optimizer
shards), the parts the authors' release leaves out (LLaVA-Lightning's ``config.json`` and
tokenizer and CLIP's ``config.json`` for LLM-Seg; the CLIP vision tower for LISA) and converts it with
:mod:`llmseg_ros.weights.importer` into ``DIR/NAME``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmseg_ros.weights.fetch import snapshot

LLAVA_LIGHTNING_7B = "liuhaotian/LLaVA-Lightning-7B-delta-v1-1"  # config.json + tokenizer only
CLIP_VIT_L14 = "openai/clip-vit-large-patch14"
BASE_FILES = (
    "config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
DEEPSPEED_FILES = ("latest", "*/mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt")
HF_FILES = ("*.json", "*.bin", "*.safetensors", "tokenizer.model")
CLIP_FILES = ("config.json", "preprocessor_config.json", "model.safetensors")
CLIP_CONFIG = ("config.json",)  # LLM-Seg's release holds the tower; its config gives the exact architecture


@dataclass(frozen=True)
class ReleasedCheckpoint:
    """One published checkpoint.

    Attributes:
        name: our name for it (``llmseg fetch-weights --released NAME``).
        method: ``llmseg`` or ``lisa``.
        format: import format (``llmseg-deepspeed`` | ``lisa-hf``).
        repo: Hugging Face repository of the checkpoint.
        files: the files of ``repo`` the import reads (glob patterns).
        base_repo: repository of the base VLM's ``config.json`` and tokenizer (LLM-Seg).
        vision_files: the files of the CLIP repository needed: its config (LLM-Seg, whose
            release holds the tower's weights) or the tower itself (LISA).
        reproduces: the published figure the checkpoint should reproduce.
    """

    name: str
    method: str
    format: str
    repo: str
    files: tuple[str, ...]
    base_repo: str | None
    vision_files: tuple[str, ...]
    reproduces: str


def _llmseg(name: str, repo: str, reproduces: str) -> ReleasedCheckpoint:
    return ReleasedCheckpoint(
        name, "llmseg", "llmseg-deepspeed", repo, DEEPSPEED_FILES, LLAVA_LIGHTNING_7B, CLIP_CONFIG, reproduces
    )


def _lisa(name: str, repo: str, reproduces: str) -> ReleasedCheckpoint:
    return ReleasedCheckpoint(name, "lisa", "lisa-hf", repo, HF_FILES, None, CLIP_FILES, reproduces)


RELEASED: dict[str, ReleasedCheckpoint] = {
    c.name: c
    for c in (
        _llmseg(
            "llmseg-20epoch",
            "JCdesu/LLM-Seg-deepspeed",
            "ReasonSeg val gIoU 55.4 / cIoU 45.6 (ncIoU 51.0), LLM-Seg paper Table 1, 20 epochs",
        ),
        _llmseg(
            "llmseg-10epoch",
            "JCdesu/LLM-Seg-deepspeed-10epoch",
            "ReasonSeg val gIoU 52.3 / cIoU 47.5 (ncIoU 48.8), LLM-Seg paper Table 1; "
            "zero-shot on LLM-Seg40K val 36.0 / 39.4 (Table 5)",
        ),
        _llmseg(
            "llmseg-llmseg40k",
            "JCdesu/llmseg_finetuned",
            "LLM-Seg40K val gIoU 45.5 / cIoU 54.2, LLM-Seg paper Table 5 (fine-tuned)",
        ),
        _lisa(
            "lisa-7b",
            "xinlai/LISA-7B-v1",
            "ReasonSeg val gIoU 52.9 / cIoU 54.0, LISA paper Table 1, LISA-7B (ft)",
        ),
        _lisa(
            "lisa-7b-explanatory",
            "xinlai/LISA-7B-v1-explanatory",
            "no figure of its own in the paper; LISA-7B (ft), ReasonSeg val 52.9 / 54.0, is the closest",
        ),
        _lisa(
            "lisa-13b-llama2",
            "xinlai/LISA-13B-llama2-v1",
            "ReasonSeg val gIoU 60.0 / cIoU 67.8, LISA paper Table 1, LISA-Llama2-13B (ft)",
        ),
        _lisa(
            "lisa-13b-llama2-explanatory",
            "xinlai/LISA-13B-llama2-v1-explanatory",
            "no figure of its own in the paper; LISA-Llama2-13B (ft), ReasonSeg val 60.0 / 67.8, is the closest",
        ),
    )
}

Downloader = Callable[[str, Path, tuple[str, ...]], Path]


def released(name: str) -> ReleasedCheckpoint:
    """The catalogue entry ``name``; ``ValueError`` listing the known names otherwise."""
    if name not in RELEASED:
        raise ValueError(f"unknown released checkpoint {name!r}; known: {', '.join(sorted(RELEASED))}")
    return RELEASED[name]


def fetch_released(
    name: str,
    directory: Path,
    *,
    sam: Path | None = None,
    dinov2: Path | None = None,
    log: Callable[[str], None] = print,
    download: Downloader | None = None,
) -> Path:
    """Download the released checkpoint ``name`` and import it into ``directory/name``.

    Args:
        directory: download root; the checkpoint's files go to ``directory/downloads``.
        sam, dinov2: the public SAM ViT-H checkpoint and DINOv2 folder, when present, to
            check the checkpoint's frozen copies against.
        download: ``(repo_id, folder, patterns) -> folder``; ``None`` = :func:`snapshot` (the hub client).

    Returns:
        The imported weights directory.
    """
    from llmseg_ros.weights.importer import ImportOptions, import_weights

    entry = released(name)
    download = download or snapshot
    downloads = directory / "downloads"
    log(f"downloading {entry.name} ({entry.repo}); it should reproduce: {entry.reproduces}")
    source = download(entry.repo, downloads / entry.repo.replace("/", "--"), entry.files)
    base = None
    if entry.base_repo is not None:
        base = download(entry.base_repo, downloads / entry.base_repo.replace("/", "--"), BASE_FILES)
    vision = download(CLIP_VIT_L14, downloads / CLIP_VIT_L14.replace("/", "--"), entry.vision_files)
    out = directory / entry.name
    options = ImportOptions(
        format=entry.format,
        source=source,
        out=out,
        base=base,
        vision_tower=vision,
        sam=sam,
        dinov2=dinov2 if entry.method == "llmseg" else None,
        overwrite=True,
    )
    import_weights(options, log=log)
    return out
