"""LLM-Seg40K-style data generation: COCO/LVIS sampling, captioning, LLM questions, masks.

Modules, one job each: ``config`` (dataclasses), ``coco`` (annotations, sampling, RLE),
``caption`` (VLM or precomputed descriptions), ``llm`` (HTTP / local chat clients, usage),
``prompt`` (the annotator prompt), ``parse`` (reply parsing and filtering), ``journal``
(resumable progress, atomic writes), ``stats`` (section 4.3 figures) and ``pipeline``
(the driver). Heavy dependencies (torch, transformers) load only when a VLM or a local
LLM is used.
"""

from llmseg_ros.datagen.config import (
    CaptionConfig,
    DatagenConfig,
    FilterConfig,
    LLMConfig,
    SamplingConfig,
)
from llmseg_ros.datagen.pipeline import RunResult, generate_dataset

__all__ = [
    "CaptionConfig",
    "DatagenConfig",
    "FilterConfig",
    "LLMConfig",
    "RunResult",
    "SamplingConfig",
    "generate_dataset",
]
