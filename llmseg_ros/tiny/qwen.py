"""A tiny random Qwen2.5-VL (windowed ViT + M-RoPE Qwen2 text model) for tests and demos.

:func:`save_tiny_qwen2_5_vl` writes a directory that ``Qwen2_5_VLForConditionalGeneration``
and ``AutoProcessor.from_pretrained`` read exactly like ``Qwen/Qwen2.5-VL-7B-Instruct``:
model config + safetensors weights, a fast tokenizer with Qwen's special tokens
(``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``,
``<|vision_end|>``, ``<|image_pad|>`` ...), a ``Qwen2VLImageProcessor`` (patch 14, merge 2,
small ``min_pixels`` / ``max_pixels`` so images become a few dozen patches), a video
processor, and Qwen's ChatML chat template. The tokenizer is a byte-level BPE trained
offline on a small built-in corpus. Nothing is downloaded; the same seed gives identical
weights. Outputs are meaningless.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmseg_ros.tiny.bpe import train_byte_level_bpe
from llmseg_ros.utils.atomic import atomic_directory

PATCH_SIZE = 14
MERGE_SIZE = 2
MIN_PIXELS = (PATCH_SIZE * MERGE_SIZE) ** 2 * 4  # 56 x 56
MAX_PIXELS = (PATCH_SIZE * MERGE_SIZE) ** 2 * 16  # e.g. 112 x 112
TEXT_HIDDEN_SIZE = 32
VISION_HIDDEN_SIZE = 32
BPE_VOCAB_SIZE = 1024

# Qwen2.5-VL's special tokens, in the order of the released tokenizer's added tokens.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL / Qwen2.5-VL ChatML template (system prompt by default, images and videos as
# <|vision_start|><|image_pad|><|vision_end|> in the order they appear in a turn).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = """
You are a helpful assistant. Find the object in the image that answers the request.
First think briefly, then answer with a JSON list of boxes in a json code block.
[{"bbox_2d": [12, 34, 56, 78], "point_2d": [30, 50], "label": "cup"}]
[{"bbox_2d": [100, 200, 300, 400], "label": "trash can"}, {"bbox_2d": [5, 6, 7, 8], "label": "mug"}]
<think>The user wants somewhere to sit.</think> <answer>[]</answer> There is no such object.
The image shows numbered regions. Which numbers answer the instruction? Answer: 3. Answer: 2, 7.
mark 1, mark 2, mark 3 and mark 5; marks 4 and 6; #8, #9, #10; regions 11, 12 and 13; none.
Where can I throw away the rest of the food and scraps after preparing a meal?
When we need to access or store things above our reach, what would be helpful to stand on?
What object in a typical modern kitchen can be used to quickly heat up leftovers or boil water?
the person, the dog, the cat, the bottle, the door, the window, the bed, the sofa, the lamp,
the plate, the bowl, the knife, the fork, the spoon, the phone, the book, the bag, the box,
the sink, the oven, the fridge, the microwave, the shelf, the ladder, the stool, the table.
zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10 11 12 16 20 32 64
left right top bottom front back middle above below next to under behind near the red blue green.
"""


def _build_tokenizer() -> Any:
    """Byte-level BPE with Qwen's special tokens and chat template (transformers fast tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    backend = train_byte_level_bpe(_CORPUS, SPECIAL_TOKENS, BPE_VOCAB_SIZE)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        padding_side="left",
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def save_tiny_qwen2_5_vl(directory: Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen2.5-VL checkpoint (model, tokenizer, processor) to ``directory``.

    Sizes: vision 2 blocks (hidden 32, 2 heads, window 56 px, the last block full
    attention), text 2 layers (hidden 32, 4 heads, 2 KV heads, M-RoPE sections [2, 1, 1]).
    The image processor resizes with Qwen's ``smart_resize`` to multiples of 28 within
    [56 x 56, 12544] pixels, so a frame becomes 4 to 16 image tokens.

    Args:
        directory: destination; created (parents too) or replaced. Written to a temporary
            sibling first, then renamed into place.
        seed: torch seed of the random weights; the same seed gives identical weights.

    Returns:
        ``directory``, loadable with ``ChatVLM.load(str(directory), ...)``.
    """
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    directory = Path(directory)
    tokenizer = _build_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": TEXT_HIDDEN_SIZE,
        "intermediate_size": 2 * TEXT_HIDDEN_SIZE,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        # head_dim 8 → 4 rotary frequencies split over (temporal, height, width).
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": 2,
        "hidden_size": VISION_HIDDEN_SIZE,
        "intermediate_size": 2 * VISION_HIDDEN_SIZE,
        "num_heads": 2,
        "out_hidden_size": TEXT_HIDDEN_SIZE,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": 2,
        "window_size": 2 * PATCH_SIZE * MERGE_SIZE,
        "fullatt_block_indexes": [1],
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    image_processor = Qwen2VLImageProcessor(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH_SIZE, merge_size=MERGE_SIZE
    )
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH_SIZE, merge_size=MERGE_SIZE
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_CHAT_TEMPLATE,
    )

    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return directory
