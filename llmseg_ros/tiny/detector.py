"""A tiny random Grounding DINO (Swin backbone, BERT text encoder) with an offline tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmseg_ros.utils.atomic import atomic_directory

# Words the tiny detector's WordPiece vocabulary knows (plus single letters and ##-pieces).
_WORDS = [
    "a",
    "an",
    "the",
    "it",
    "is",
    "this",
    "that",
    "of",
    "on",
    "in",
    "to",
    "and",
    "or",
    "with",
    "for",
    "something",
    "thing",
    "object",
    "objects",
    "cup",
    "mug",
    "table",
    "stool",
    "chair",
    "bin",
    "trash",
    "can",
    "red",
    "blue",
    "green",
    "yellow",
    "white",
    "black",
    "shelf",
    "book",
    "plate",
    "window",
    "floor",
    "wall",
    "person",
    "dog",
    "cat",
    "bottle",
    "knife",
    "fork",
    "spoon",
    "box",
    "bag",
    "door",
    "sofa",
    "bed",
]


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast  # type: ignore[attr-defined]

    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", "!", "'", "-"]
    vocab += _WORDS + letters + [f"##{c}" for c in letters]
    index = {w: i for i, w in enumerate(dict.fromkeys(vocab))}
    tk = Tokenizer(models.WordPiece(index, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", index["[CLS]"]), ("[SEP]", index["[SEP]"])],
    )
    return BertTokenizerFast(
        tokenizer_object=tk,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def save_tiny_grounding_dino(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``GroundingDinoForObjectDetection`` + processor to ``directory``.

    Loadable with ``AutoModelForZeroShotObjectDetection.from_pretrained`` /
    ``AutoProcessor.from_pretrained`` like the real checkpoints. Written to a temporary
    sibling and renamed into place.
    """
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    directory = Path(directory)
    tokenizer = _tokenizer()
    backbone = SwinConfig(  # type: ignore[call-arg]
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        out_features=["stage2", "stage3", "stage4"],
    )
    text = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        num_queries=20,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        d_model=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
    )
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 192}),
        tokenizer=tokenizer,
    )
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return directory
