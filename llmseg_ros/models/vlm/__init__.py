"""The ``<SEG>`` VLM (LLaVA + ``<SEG>``): :class:`SegVLM` and its per-frame :class:`VLMPrefix`.

Modules: ``loading`` (checkpoint, quantisation, ``<SEG>`` token, LoRA adapters),
``conversation`` (chat text and tokenisation), ``prefix`` (forward passes and the
image-prefix cache), ``query`` (teacher-forced ``<SEG>`` query), ``generation`` (greedy
answers), ``training`` (the batched training pass) and ``model`` (the :class:`SegVLM`
facade that composes them).
"""

from llmseg_ros.models.vlm.loading import ADAPTER_META_NAME, DEFAULT_VLM, QUANTIZATION_MODES
from llmseg_ros.models.vlm.model import SegVLM
from llmseg_ros.models.vlm.prefix import VLMPrefix

__all__ = ["ADAPTER_META_NAME", "DEFAULT_VLM", "QUANTIZATION_MODES", "SegVLM", "VLMPrefix"]
