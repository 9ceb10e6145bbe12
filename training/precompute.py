"""Precompute SAM proposals (and optionally DINOv2 features) into a resumable cache.

The trainer (``training/train.py``, a source's ``cache``) and the evaluator read the cache
instead of re-running SAM. Killed or crashed runs restart where they stopped: run the same
command again. Layout and format: ``llmseg_ros/training/cache.py``.

Examples::

    # ReasonSeg train + val with the paper's SAM ViT-H settings and DINOv2-L features
    python training/precompute.py --dataset reasonseg --root data/ReasonSeg --split train val \\
        --sam-checkpoint weights/sam_vit_h_4b8939.pth --features --out cache/reasonseg

    # any folder of images (for instance frames exported from a robot's rosbag)
    python training/precompute.py --images data/robot/images --sam-checkpoint weights/sam_vit_h_4b8939.pth \\
        --out cache/robot

    # every GPU of a machine (one process per GPU; each takes its share of the shards)
    accelerate launch --num_processes 8 training/precompute.py --dataset reasonseg --root data/ReasonSeg \
        --split train val --sam-checkpoint weights/sam_vit_h_4b8939.pth --features --out cache/reasonseg

    # several machines sharing the cache directory (run on each; --node_rank 0 on the first)
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr node0 --master_port 29500 \
        training/precompute.py --images /shared/images --sam-checkpoint weights/sam_vit_h_4b8939.pth --out /shared/cache

    # mechanics only, tiny random models on CPU (two CPU processes: --multi_gpu starts them, gloo backend)
    python training/precompute.py --images some/folder --profile tiny --features --out /tmp/cache
    accelerate launch --multi_gpu --num_processes 2 training/precompute.py --images some/folder \
        --profile tiny --features --out /tmp/cache2

A killed job, or a killed process of a job, is resumed by running the same command again
(with any number of processes): finished shards are kept, the others are computed once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmseg_ros.config import SAM_MODEL_TYPES, ProposalConfig
from llmseg_ros.training.claims import DEFAULT_LEASE_SECONDS
from llmseg_ros.training.config import SOURCE_KINDS
from llmseg_ros.training.precompute import PrecomputeSummary
from llmseg_ros.training.precompute_run import ENCODER_DTYPES, PrecomputeConfig, run_precompute
from llmseg_ros.utils.configfile import load_config_file


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    inputs = parser.add_argument_group("inputs (folders and/or one dataset)")
    inputs.add_argument("--images", nargs="+", default=[], metavar="DIR", help="image folders (recursive)")
    inputs.add_argument("--dataset", choices=SOURCE_KINDS, help="dataset format of --root")
    inputs.add_argument("--root", help="ReasonSeg folder, LLM-Seg40K JSON file or JSONL file")
    inputs.add_argument("--split", nargs="+", default=["train"], help="ReasonSeg split(s) (default: train)")
    inputs.add_argument("--image-root", help="LLM-Seg40K image folder (default: the JSON file's folder)")
    parser.add_argument("--out", required=True, help="cache directory (resumed if it exists)")
    models = parser.add_argument_group("models")
    models.add_argument("--sam-checkpoint", help="SAM .pth checkpoint (not needed with --profile tiny)")
    models.add_argument("--sam-model-type", default="vit_h", choices=SAM_MODEL_TYPES)
    models.add_argument(
        "--proposal-config",
        help="YAML/JSON file of ProposalConfig fields (default: the reference generator's settings)",
    )
    models.add_argument("--max-proposals", type=int, help="override ProposalConfig.max_proposals (50)")
    models.add_argument("--features", action="store_true", help="also cache DINOv2 patch features (float16)")
    models.add_argument("--dinov2", default="facebook/dinov2-large", help="DINOv2 hub id or directory")
    models.add_argument("--embed-size", type=int, default=896, help="DINOv2 input long side (896)")
    models.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    models.add_argument("--dtype", default="auto", help="DINOv2 dtype: auto | float32 | float16 | bfloat16")
    models.add_argument(
        "--encoder-dtype",
        default="float32",
        choices=ENCODER_DTYPES,
        help="SAM image encoder under CUDA autocast (bfloat16 / float16: faster, CUDA only, masks not "
        "bit-identical to float32; recorded in the cache)",
    )
    models.add_argument(
        "--feature-batch-size", type=int, default=8, help="images per DINOv2 forward pass (8)"
    )
    models.add_argument(
        "--profile", choices=("custom", "tiny"), default="custom", help="tiny: random tiny models"
    )
    parser.add_argument("--shard-size", type=int, default=32, help="images per shard (32)")
    parser.add_argument("--max-shards", type=int, help="stop after writing this many shards (per process)")
    parser.add_argument(
        "--claim-timeout",
        type=float,
        default=DEFAULT_LEASE_SECONDS,
        help=f"seconds after which the shard of a silent process on another machine is taken over "
        f"({DEFAULT_LEASE_SECONDS:.0f}; a dead process on this machine is noticed at once)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> PrecomputeConfig:
    """The :class:`PrecomputeConfig` the command line describes."""
    proposals = (
        load_config_file(args.proposal_config).build(lambda data: ProposalConfig(**data))
        if args.proposal_config
        else ProposalConfig()
    )
    if args.max_proposals is not None:
        proposals = ProposalConfig(**{**proposals.__dict__, "max_proposals": args.max_proposals})
    return PrecomputeConfig(
        output_dir=args.out,
        images=list(args.images),
        dataset=args.dataset,
        root=args.root,
        splits=list(args.split),
        image_root=args.image_root,
        sam_checkpoint=args.sam_checkpoint,
        sam_model_type=args.sam_model_type,
        proposals=proposals,
        features=args.features,
        dinov2=args.dinov2,
        embed_size=args.embed_size,
        device=args.device,
        dtype=args.dtype,
        encoder_dtype=args.encoder_dtype,
        feature_batch_size=args.feature_batch_size,
        shard_size=args.shard_size,
        max_shards=args.max_shards,
        profile=args.profile,
        progress=not args.no_progress,
        lease_seconds=args.claim_timeout,
    )


def main(argv: Sequence[str] | None = None) -> PrecomputeSummary:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:  # a bad config file or flag: usage error, exit 2 like argparse
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        summary = run_precompute(config)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if os.environ.get("RANK", "0") == "0":  # one report per job (torchrun / accelerate set RANK)
        print(summary.format())
        print(json.dumps(summary.to_dict(), indent=2))
    return summary


if __name__ == "__main__":
    main()
