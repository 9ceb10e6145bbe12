"""Generate an LLM-Seg40K-style reasoning-segmentation split from COCO/LVIS instance annotations.

Pipeline (LLM-Seg paper, section 4.2): sample simple (2–5 categories) and complex (> 5)
images → describe each with a VLM (or read ``--captions``) → ask a text LLM, as an
annotator following seven rules with one worked example, for question/answer pairs whose
answers are the image's category names → keep valid pairs (≤ 2 per answer) → store the
union mask of each answer's category as COCO RLE.

Writes ``--out`` (one JSON keyed by image file name), a progress journal
(``<out>.journal.jsonl``; rerun the same command to resume after a crash) and statistics
(``<out stem>.stats.json``, also printed). The API key is read from the environment
(``LLMSEG_LLM_API_KEY`` or ``OPENAI_API_KEY``), never from the command line; base URL and
model fall back to ``LLMSEG_LLM_BASE_URL`` / ``OPENAI_BASE_URL`` and ``LLMSEG_LLM_MODEL`` /
``OPENAI_MODEL``.

Exit status: 0 when every sampled image is done, 1 when some failed (outputs are still
written; rerun to retry them), 2 on bad input (annotations, captions, options, an output
path that cannot be written, a journal of another run) or when the LLM server refuses the
credentials, model or URL (401/403/404, or a redirect, which is never followed; finished
images stay in the journal), 130 when interrupted (Ctrl-C; rerun to resume).

Examples::

    python training/generate_dataset.py --annotations lvis_v1_train.json --images coco/train2017 \
        --out data/llmseg40k_train.json --captioner llava-hf/llava-1.5-13b-hf \
        --llm-model gpt-4 --prices 0.03,0.06 --workers 16
    python training/generate_dataset.py --annotations instances.json --captions captions.json \
        --out out.json --num-simple 100 --num-complex 50 --llm-base-url http://localhost:8000/v1 \
        --llm-model my-model
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmseg_ros.datagen.config import (
    CAPTION_PROMPT,
    DEFAULT_DEADLINE_S,
    DEFAULT_MAX_REPLY_BYTES,
    FROM_DATASETS,
    CaptionConfig,
    DatagenConfig,
    FilterConfig,
    LLMConfig,
    SamplingConfig,
)


def _prices(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 2 or min(values) < 0:
        raise argparse.ArgumentTypeError(
            f"--prices takes PROMPT,COMPLETION cost per 1000 tokens (two numbers >= 0), got {text!r}"
        )
    return values[0], values[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    io = parser.add_argument_group("data")
    io.add_argument("--annotations", required=True, help="COCO/LVIS instance JSON")
    io.add_argument("--images", help="image folder (needed with --captioner)")
    io.add_argument("--out", required=True, help="output JSON (LLM-Seg40K layout)")
    io.add_argument("--journal", help="progress journal (default: <out>.journal.jsonl)")
    io.add_argument("--stats", help="statistics JSON (default: <out stem>.stats.json)")
    io.add_argument("--from-dataset", default="coco", choices=FROM_DATASETS)

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--num-simple", type=int, default=6000, help="simple images to draw (paper: 6000)")
    sampling.add_argument(
        "--num-complex", type=int, default=4000, help="complex images to draw (paper: 4000)"
    )
    sampling.add_argument("--simple-min-categories", type=int, default=2)
    sampling.add_argument("--simple-max-categories", type=int, default=5)
    sampling.add_argument("--complex-min-categories", type=int, default=6)
    sampling.add_argument("--seed", type=int, default=0)

    caption = parser.add_argument_group("captions (exactly one of --captioner / --captions)")
    source = caption.add_mutually_exclusive_group(required=True)
    source.add_argument("--captioner", help="hub id or folder of an image-text-to-text VLM")
    source.add_argument("--captions", help="precomputed captions JSON {file name: text}")
    caption.add_argument("--caption-prompt", default=CAPTION_PROMPT)
    caption.add_argument("--caption-max-new-tokens", type=int, default=256)

    llm = parser.add_argument_group("question-writing LLM")
    llm.add_argument("--llm-base-url", help="OpenAI-compatible API root, e.g. https://api.openai.com/v1")
    llm.add_argument("--llm-model", help="model name sent to the API")
    llm.add_argument("--llm-local", help="hub id or folder of a local causal LM (instead of HTTP)")
    llm.add_argument(
        "--llm-timeout",
        type=float,
        default=120.0,
        help="seconds one socket operation (connect, a read) may take",
    )
    llm.add_argument(
        "--llm-deadline",
        type=float,
        default=DEFAULT_DEADLINE_S,
        help="seconds one chat request may take in all, retries included",
    )
    llm.add_argument(
        "--llm-max-reply-bytes",
        type=int,
        default=DEFAULT_MAX_REPLY_BYTES,
        help="largest reply accepted from the LLM server",
    )
    llm.add_argument("--max-retries", type=int, default=6)
    llm.add_argument("--retry-base-delay", type=float, default=1.0, help="seconds; doubles per retry")
    llm.add_argument(
        "--retry-max-delay", type=float, default=60.0, help="seconds; caps backoff and Retry-After"
    )
    llm.add_argument("--temperature", type=float, default=None)
    llm.add_argument("--max-tokens", type=int, default=1024)
    llm.add_argument(
        "--prices",
        type=_prices,
        default=(0.0, 0.0),
        metavar="PROMPT,COMPLETION",
        help="cost per 1000 prompt / completion tokens",
    )

    filt = parser.add_argument_group("filtering")
    filt.add_argument("--num-questions", type=int, default=5, help="questions asked for per image (paper: 5)")
    filt.add_argument("--max-per-answer", type=int, default=2, help="questions kept per category (paper: 2)")
    filt.add_argument("--keep-name-leaks", action="store_true", help="keep questions that name their answer")

    run = parser.add_argument_group("run")
    run.add_argument("--workers", type=int, default=8, help="images in flight at once")
    run.add_argument("--device", default="auto", help="device of the local VLM / LLM")
    run.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def config_from_args(args: argparse.Namespace) -> DatagenConfig:
    """Translate parsed arguments into a validated :class:`DatagenConfig`."""
    return DatagenConfig(
        annotations=args.annotations,
        out=args.out,
        caption=CaptionConfig(
            model=args.captioner,
            captions_path=args.captions,
            prompt=args.caption_prompt,
            max_new_tokens=args.caption_max_new_tokens,
            device=args.device,
            dtype=args.dtype,
        ),
        images_dir=args.images,
        from_dataset=args.from_dataset,
        sampling=SamplingConfig(
            num_simple=args.num_simple,
            num_complex=args.num_complex,
            simple_min_categories=args.simple_min_categories,
            simple_max_categories=args.simple_max_categories,
            complex_min_categories=args.complex_min_categories,
            seed=args.seed,
        ),
        llm=LLMConfig(
            base_url=args.llm_base_url,
            model=args.llm_model,
            local_model=args.llm_local,
            timeout_s=args.llm_timeout,
            deadline_s=args.llm_deadline,
            max_reply_bytes=args.llm_max_reply_bytes,
            max_retries=args.max_retries,
            backoff_base_s=args.retry_base_delay,
            backoff_max_s=args.retry_max_delay,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            prompt_price_per_1k=args.prices[0],
            completion_price_per_1k=args.prices[1],
            device=args.device,
            dtype=args.dtype,
        ),
        filter=FilterConfig(
            num_questions=args.num_questions,
            max_questions_per_answer=args.max_per_answer,
            drop_name_leaks=not args.keep_name_leaks,
        ),
        workers=args.workers,
        journal_path=args.journal,
        stats_path=args.stats,
        progress=not args.no_progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))

    from llmseg_ros.datagen.llm import LLMRequestError
    from llmseg_ros.datagen.pipeline import generate_dataset
    from llmseg_ros.datagen.stats import format_statistics

    try:
        result = generate_dataset(config)
    except (ValueError, LLMRequestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output, journal or statistics path that cannot be written
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; finished images are in the journal: run the same command to resume", file=sys.stderr
        )
        return 130
    print(format_statistics(result.stats))
    print(f"wrote {config.out} ({len(result.records)} images), statistics {config.stats_path}")
    if result.failures:
        print(
            f"{len(result.failures)} images failed (first: {next(iter(result.failures.items()))}); "
            "run the same command again to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
