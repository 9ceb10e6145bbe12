"""The sample type every dataset reader yields."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE_VALUE = 255
"""Ground-truth value of pixels left out of the metrics (ReasonSeg's "ignore" polygons)."""


def check_label_mask(mask: np.ndarray, what: str = "mask") -> np.ndarray:
    """Validate a ground-truth mask: (H, W) uint8 with values in {0, 1, 255}.

    Returns the mask unchanged. Raises ``TypeError`` / ``ValueError`` naming ``what``.
    """
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(mask).__name__}")
    if mask.dtype != np.uint8:
        raise TypeError(f"{what} must be uint8 with values 0/1/255, got dtype {mask.dtype}")
    if mask.ndim != 2:
        raise ValueError(f"{what} must be (H, W), got shape {mask.shape}")
    bad = (mask > 1) & (mask != IGNORE_VALUE)
    if bad.any():
        values = sorted({int(v) for v in np.unique(mask[bad])[:5]})
        raise ValueError(f"{what} values must be 0, 1 or {IGNORE_VALUE}, found {values}")
    return mask


@dataclass
class Sample:
    """One (image, instruction, ground-truth mask) triple.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        instruction: the instruction the model answers (ReasonSeg: the first ``text``).
        is_sentence: ``True`` for a sentence ("long query"), ``False`` for a phrase
            ("short query"), ``None`` when the source does not say.
        mask: (H, W) uint8 ground truth: 0 background, 1 target, 255 ignored by the metrics.
        image_id: identifier unique within the dataset split; prediction files in
            ``--pred-dir`` mode are named ``{image_id}.png``.
        source: which reader produced the sample (``reasonseg``, ``llmseg40k``, ``jsonl``).
        image_path: the image file, when the sample came from one.
        instructions: every instruction attached to the image (ReasonSeg's ``text``
            list: paraphrases of the same target); ``instruction`` is the first.
        answer: the dataset's text answer (LLM-Seg40K category names), when present.
    """

    image: np.ndarray
    instruction: str
    is_sentence: bool | None
    mask: np.ndarray
    image_id: str
    source: str
    image_path: str | None = None
    instructions: tuple[str, ...] = field(default_factory=tuple)
    answer: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.image, np.ndarray) or self.image.dtype != np.uint8:
            raise TypeError(f"image of sample {self.image_id!r} must be a uint8 numpy array")
        if self.image.ndim != 3 or self.image.shape[2] != 3:
            raise ValueError(f"image of sample {self.image_id!r} must be (H, W, 3), got {self.image.shape}")
        check_label_mask(self.mask, f"mask of sample {self.image_id!r}")
        if self.mask.shape != self.image.shape[:2]:
            raise ValueError(
                f"mask of sample {self.image_id!r} has shape {self.mask.shape}, "
                f"expected the image's {self.image.shape[:2]}"
            )
        if not isinstance(self.instruction, str) or not self.instruction.strip():
            raise ValueError(f"instruction of sample {self.image_id!r} must be a non-empty string")
        if self.is_sentence is not None and not isinstance(self.is_sentence, bool):
            raise TypeError(
                f"is_sentence of sample {self.image_id!r} must be a bool or None, got {self.is_sentence!r}"
            )
        if not self.image_id:
            raise ValueError("image_id must be a non-empty string")
        self.instructions = tuple(self.instructions) or (self.instruction,)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the image and mask."""
        return int(self.image.shape[0]), int(self.image.shape[1])
