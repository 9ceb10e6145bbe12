"""The byte-level BPE the tiny chat models' tokenizers are trained with (offline, deterministic)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def train_byte_level_bpe(corpus: str, special_tokens: Sequence[str], vocab_size: int) -> Any:
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on the non-blank lines of ``corpus``.

    Every byte is in the initial alphabet, so any string tokenizes; ``special_tokens``
    get the first ids, in order. The same arguments give the same tokenizer.

    Args:
        corpus: training text, one sentence per line (leading/trailing space stripped).
        special_tokens: tokens added as whole units (ids ``0 .. len - 1``).
        vocab_size: target vocabulary size (special tokens and the 256 bytes included).
    Returns:
        The trained backend, to wrap in ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line.strip() for line in corpus.strip().splitlines() if line.strip()]
    backend.train_from_iterator(lines, trainer)
    return backend
