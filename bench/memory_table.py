"""Expected GPU memory of the model weights per method and memory mode, COMPUTED from
parameter counts (no GPU, no downloads needed).

    python bench/memory_table.py [--out bench/results]

Every model is instantiated on PyTorch's ``meta`` device from the public architecture
of the default checkpoints, so the parameter counts are exact for those architectures;
bytes per parameter then follow from the mode. Activations, the KV cache and the CUDA
context (typically 0.3–0.6 GiB) come on top; measure them with bench/bench_pipeline.py
on the robot's GPU.

Modes:
    fp32       everything float32 (the CPU default)
    fp16       everything float16 / bfloat16 (the GPU default)
    vlm-8bit   the VLM's language-model linear layers in int8 (bitsandbytes LLM.int8),
               everything else float16; SAM and DINOv2 never quantised
    vlm-4bit   the same in NF4 with double quantisation (~0.53 byte / parameter)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

GIB = 2**30
BYTES_4BIT = 0.5 + 0.5 * 4 / 64 / 8 + 4 / (64 * 256)  # NF4 + double-quantised absmax per block of 64


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sam_vit_h() -> nn.Module:
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        return sam_model_registry["vit_h"](checkpoint=None)


def dinov2_large() -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518, patch_size=14
    )
    with torch.device("meta"):
        return Dinov2Model(cfg)


def llava_1_5_7b() -> nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        text_config=LlamaConfig(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
        ),
        image_token_index=32000,
    )
    with torch.device("meta"):
        return LlavaForConditionalGeneration(cfg)


def qwen2_5_vl_7b() -> nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
        },
        vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "out_hidden_size": 3584},
    )
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(cfg)


def grounding_dino_tiny() -> nn.Module:
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    with torch.device("meta"):
        return GroundingDinoForObjectDetection(GroundingDinoConfig())


def split_vlm(model: nn.Module) -> tuple[int, int]:
    """(parameters in quantisable language-model linear layers, all other parameters)."""
    quantisable = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "language_model" in name and not name.endswith("lm_head"):
            quantisable += module.weight.numel()
    return quantisable, _count(model) - quantisable


def heads_params(hidden: int) -> int:
    from llmseg_ros.models.heads import TextProjection
    from llmseg_ros.models.selector import ProposalSelector

    with torch.device("meta"):
        return _count(TextProjection(hidden)) + _count(ProposalSelector()) + 1024 * 256 + 256


METHOD_MODELS = {
    "llmseg": ("sam_vit_h", "dinov2_large", "llava_1_5_7b", "heads"),
    "lisa": ("sam_vit_h", "llava_1_5_7b", "heads"),
    "grounded": ("sam_vit_h", "llava_1_5_7b", "grounding_dino_tiny"),
    "vlm_grounding": ("sam_vit_h", "qwen2_5_vl_7b"),
    "vlm_marks": ("sam_vit_h", "qwen2_5_vl_7b"),
}


def compute() -> dict[str, object]:
    counts: dict[str, tuple[int, int]] = {}  # name -> (quantisable, other)
    for name, builder in (
        ("sam_vit_h", sam_vit_h),
        ("dinov2_large", dinov2_large),
        ("grounding_dino_tiny", grounding_dino_tiny),
    ):
        counts[name] = (0, _count(builder()))
    for name, builder in (("llava_1_5_7b", llava_1_5_7b), ("qwen2_5_vl_7b", qwen2_5_vl_7b)):
        counts[name] = split_vlm(builder())
    counts["heads"] = (0, heads_params(4096))
    modes = {
        "fp32": lambda q, o: (q + o) * 4,
        "fp16": lambda q, o: (q + o) * 2,
        "vlm-8bit": lambda q, o: q * 1 + o * 2,
        "vlm-4bit": lambda q, o: q * BYTES_4BIT + o * 2,
    }
    table: dict[str, dict[str, float]] = {}
    for method, models in METHOD_MODELS.items():
        table[method] = {}
        for mode, fn in modes.items():
            total = sum(fn(*counts[m]) for m in models)
            table[method][mode] = total / GIB
    return {
        "note": "computed from parameter counts on the meta device; weights only (no activations, "
        "KV cache or CUDA context)",
        "parameters": {k: q + o for k, (q, o) in counts.items()},
        "gib": table,
    }


def to_markdown(res: dict) -> str:
    params = res["parameters"]
    lines = [
        "### Expected GPU memory of the weights (GiB) — computed from parameter counts, not measured",
        "",
        "| method | models | fp32 | fp16/bf16 (GPU default) | VLM 8-bit | VLM 4-bit |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for method, row in res["gib"].items():
        models = ", ".join(m for m in METHOD_MODELS[method] if m != "heads")
        lines.append(
            f"| {method} | {models} | {row['fp32']:.1f} | {row['fp16']:.1f} | {row['vlm-8bit']:.1f} | "
            f"{row['vlm-4bit']:.1f} |"
        )
    lines += ["", "Parameters: " + ", ".join(f"{k} {v / 1e6:.0f} M" for k, v in params.items()), ""]
    lines.append(f"Note: {res['note']}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    res = compute()
    md = to_markdown(res)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    from llmseg_ros.utils.atomic import write_results

    write_results(args.out, "memory", res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
