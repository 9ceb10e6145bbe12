"""``llmseg import-weights`` and ``llmseg fetch-weights --released NAME``: the published
LLM-Seg / LISA checkpoints as weights directories."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

from llmseg_ros.cli.common import EXIT_FAIL, EXIT_MISSING_WEIGHTS, EXIT_OK, EXIT_USAGE
from llmseg_ros.weights.catalog import RELEASED
from llmseg_ros.weights.importer import DEFAULT_SHARD_BYTES, FORMATS

Command = Callable[[argparse.Namespace], int]


def add_import_command(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``llmseg import-weights``."""
    imp = sub.add_parser(
        "import-weights",
        parents=parents,
        help="convert a published LLM-Seg (DeepSpeed) or LISA (Hugging Face) checkpoint into a weights directory",
    )
    imp.add_argument(
        "source", type=Path, help="the checkpoint: DeepSpeed ckpt_model folder, or LISA's HF folder"
    )
    imp.add_argument("--format", required=True, choices=FORMATS, help="the checkpoint's format")
    imp.add_argument("--out", type=Path, required=True, help="weights directory to write")
    imp.add_argument(
        "--base", type=Path, help="llmseg-deepspeed: the LLaVA-Lightning-7B-v1 folder (config + tokenizer)"
    )
    imp.add_argument(
        "--vision-tower", type=Path, help="the openai/clip-vit-large-patch14 folder (required for lisa-hf)"
    )
    imp.add_argument(
        "--sam", type=Path, help="public SAM ViT-H checkpoint to check the frozen SAM copy against"
    )
    imp.add_argument(
        "--dinov2", type=Path, help="facebook/dinov2-large folder to check the frozen DINOv2 copy against"
    )
    imp.add_argument(
        "--lora-alpha", type=int, default=16, help="LoRA alpha the checkpoint was trained with (16)"
    )
    imp.add_argument(
        "--lora-dropout", type=float, default=0.05, help="LoRA dropout it was trained with (0.05)"
    )
    imp.add_argument(
        "--shard-gb",
        type=float,
        default=DEFAULT_SHARD_BYTES / 1024**3,
        help="largest VLM shard written (GiB)",
    )
    imp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    imp.add_argument("--dry-run", action="store_true", help="print what each tensor becomes; write nothing")
    imp.set_defaults(func=cmd_import_weights)


def cmd_import_weights(args: argparse.Namespace) -> int:
    from llmseg_ros.weights.importer import ImportOptions, import_weights

    try:
        options = ImportOptions(
            format=args.format,
            source=args.source,
            out=args.out,
            base=args.base,
            vision_tower=args.vision_tower,
            sam=args.sam,
            dinov2=args.dinov2,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            shard_bytes=max(1, int(args.shard_gb * 1024**3)),
            overwrite=args.overwrite,
            dry_run=args.dry_run,
        )
        plan = import_weights(options)
    except (ValueError, OSError) as exc:
        return _failed(exc)
    if not args.dry_run:
        print(_run_hint(options.out, plan.method, args.sam, args.dinov2))
    return EXIT_OK


def _failed(exc: Exception) -> int:
    """Print ``exc`` as one error line; its exit code: 3 missing files, 1 download failure, 2 bad input."""
    from llmseg_ros.weights.fetch import FetchError

    print(f"error: {exc}", file=sys.stderr)
    if isinstance(exc, FileNotFoundError):
        return EXIT_MISSING_WEIGHTS
    return EXIT_FAIL if isinstance(exc, FetchError) else EXIT_USAGE


def _run_hint(weights: Path, method: str, sam: Path | None, dinov2: Path | None) -> str:
    parts = ["llmseg segment", f"--weights {weights}", f"--method {method}"]
    parts.append(f"--sam-checkpoint {sam or 'SAM_VIT_H.pth'}")
    if method == "llmseg":
        parts.append(f"--dinov2 {dinov2 or 'facebook/dinov2-large'}")
    return "run it with: " + " ".join(parts) + " --image IMAGE --instruction TEXT --out MASK.png"


def add_released_option(fetch: argparse.ArgumentParser) -> None:
    """Teach ``llmseg fetch-weights`` the published checkpoints (``--released NAME``)."""
    fetch.add_argument(
        "--released",
        action="append",
        choices=sorted(RELEASED),
        metavar="NAME",
        help="download and import a published checkpoint: " + ", ".join(sorted(RELEASED)),
    )
    fallback = fetch.get_default("func")
    fetch.set_defaults(func=functools.partial(cmd_fetch_released, fallback=fallback))


def cmd_fetch_released(args: argparse.Namespace, fallback: Command) -> int:
    """``fetch-weights --released``: SAM (+ DINOv2 for LLM-Seg) and the checkpoints, imported."""
    if not args.released:
        return fallback(args)
    from llmseg_ros.utils.atomic import atomic_write_text
    from llmseg_ros.weights.catalog import fetch_released
    from llmseg_ros.weights.fetch import FetchError, FetchFailure, FetchPlan, fetch_all

    names = tuple(dict.fromkeys(args.released))
    needs_dinov2 = any(RELEASED[name].method == "llmseg" for name in names)
    hub = (args.dinov2,) if needs_dinov2 and args.dinov2 else ()
    try:
        plan = FetchPlan(
            directory=args.dir, sam_model_type=None if args.no_sam else args.sam_model_type, hub_models=hub
        )
    except ValueError as exc:
        return _failed(exc)
    result = fetch_all(plan)  # goes on past failures; so do the checkpoints below
    paths = dict(result.paths)
    dinov2 = paths.get(args.dinov2) if hub else None
    for name in names:
        try:
            paths[name] = fetch_released(name, args.dir, sam=paths.get("sam"), dinov2=dinov2)
        except FetchError as exc:
            result.failures.append(FetchFailure(name, args.dir / name, exc.reason, exc.remedy))
        except (ValueError, OSError) as exc:
            return _failed(exc)
    config: dict[str, str] = {"sam_model_type": args.sam_model_type}
    if "sam" in paths:
        config["sam_checkpoint"] = str(paths["sam"])
    if dinov2 is not None:
        config["dinov2"] = str(dinov2)
    written = atomic_write_text(args.dir / "llmseg_config.json", json.dumps(config, indent=2) + "\n")
    print(f"model paths written to {written} (use it with --config)")
    for name in (n for n in names if n in paths):
        entry = RELEASED[name]
        print(f"{name}: should reproduce {entry.reproduces}")
        print(_run_hint(paths[name], entry.method, paths.get("sam"), dinov2))
    if result.failures:
        result.paths.update(paths)
        print(f"error: {result.failure_report()}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK
