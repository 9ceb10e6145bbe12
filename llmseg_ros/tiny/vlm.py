"""A tiny random LLaVA (CLIP vision tower + Llama text model) for tests and demos.

:func:`save_tiny_llava` writes a directory that ``LlavaForConditionalGeneration`` /
``AutoProcessor.from_pretrained`` read exactly like a hub checkpoint such as
``llava-hf/llava-1.5-7b-hf``: model config + safetensors weights, a fast tokenizer with
``<s>``/``</s>``/``<unk>``/``<pad>``/``<image>``, a ``CLIPImageProcessor`` and a
``LlavaProcessor`` whose image-token expansion matches the vision tower's patch count,
and the LLaVA-1.5 chat template. The tokenizer is a byte-level BPE trained offline on a
small built-in English corpus, so every string tokenizes and common words are single
tokens. Nothing is downloaded; the same seed gives byte-identical weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmseg_ros.tiny.bpe import train_byte_level_bpe
from llmseg_ros.utils.atomic import atomic_directory

# Sizes of the tiny model (CPU forward in milliseconds).
IMAGE_SIZE = 64
PATCH_SIZE = 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64 patch tokens; the CLS token is dropped
TEXT_HIDDEN_SIZE = 64
VISION_HIDDEN_SIZE = 32
BPE_VOCAB_SIZE = 1024

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")

# The chat template shipped with llava-hf/llava-1.5-*-hf processors: images first in a
# turn, "ROLE: " prefixes, "ASSISTANT:" as the generation prompt.
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}"
    "{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}"
    "{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_CORPUS = """
USER: ASSISTANT: What is the object in this image? Please output segmentation mask.
What is the cup in this image? Please respond with segmentation mask. It is here.
Can you segment the chair in this image? Please segment the table in this image.
Sure, it is. Sure, the segmentation result is this. It is the red mug on the left.
Where can I throw away the rest of the food and scraps after preparing a meal?
When we need to access or store things above our reach, what would be helpful to stand on?
What object in a typical modern kitchen can be used to quickly heat up leftovers or boil water?
Where could I sit down and rest for a while? Which part of the car would you open to put bags in?
Find something that can hold water. Show me where the robot should put the box.
Please output segmentation mask and explain why. Because it is used for cooking food.
The person, the dog, the cat, the bottle, the door, the window, the bed, the sofa, the lamp,
the plate, the bowl, the knife, the fork, the spoon, the phone, the book, the bag, the box,
the tree, the road, the sky, the grass, the wall, the floor, the sink, the oven, the fridge,
the microwave, the trash can, the shelf, the ladder, the stool, the desk, the computer, the screen.
A man and a woman are standing next to a white car near the big blue building on the right side.
There are two small boxes on the wooden shelf and one large green bottle under the kitchen table.
Explain the reason and give some explanation: it is useful, it is safe, it is close, it is open.
one two three four five six seven eight nine ten, up down left right top bottom front back middle.
I you he she we they it this that these those, a an the of in on at to for with from by about.
is are was were be been can could would should do does did have has had will may might must.
Yes. No. Maybe. Thank you! Hello, robot: please pick up the yellow ball and hand it to me.
"""


def _build_tokenizer() -> Any:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = train_byte_level_bpe(_CORPUS, SPECIAL_TOKENS, BPE_VOCAB_SIZE)
    bos_id = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",
    )


def save_tiny_llava(directory: Path, seed: int = 0, *, pad_vocab_to_multiple_of: int | None = None) -> Path:
    """Write a tiny random LLaVA checkpoint (model, tokenizer, processor) to ``directory``.

    Args:
        directory: destination; created (parents too) or replaced. Written to a temporary
            sibling first, then renamed into place.
        seed: torch seed of the random weights; the same seed gives identical weights.
        pad_vocab_to_multiple_of: give the embedding matrix more rows than the tokenizer
            has tokens, rounded up to this multiple (as ``llava-hf/llava-1.5-7b-hf`` does,
            32064 rows for 32002 tokens); ``None`` = exactly one row per token.

    Returns:
        ``directory``. Load it with ``SegVLM.load(directory, ...)`` or with
        ``LlavaForConditionalGeneration.from_pretrained`` + ``AutoProcessor.from_pretrained``.
        Images are resized/cropped to 64×64 and expand to 64 ``<image>`` tokens.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    if pad_vocab_to_multiple_of is not None and pad_vocab_to_multiple_of < 1:
        raise ValueError(f"pad_vocab_to_multiple_of must be >= 1 or None, got {pad_vocab_to_multiple_of}")
    directory = Path(directory)
    tokenizer = _build_tokenizer()
    vocab_size = len(tokenizer)
    if pad_vocab_to_multiple_of is not None:
        vocab_size = -(-vocab_size // pad_vocab_to_multiple_of) * pad_vocab_to_multiple_of
    text_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=2 * TEXT_HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=VISION_HIDDEN_SIZE,
        intermediate_size=2 * VISION_HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=VISION_HIDDEN_SIZE,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=LLAVA_15_CHAT_TEMPLATE,
    )

    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return directory
