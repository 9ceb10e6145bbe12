"""Open-vocabulary box detector (Grounding DINO through ``transformers``) for the grounded method."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class Detections:
    """Detector output in original-image pixels.

    Attributes:
        boxes: (N, 4) float32 XYXY.
        scores: (N,) float32 in [0, 1].
        labels: the phrase span each box was matched to.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: list[str]


class GroundingDetector:
    """Grounding DINO (any ``AutoModelForZeroShotObjectDetection`` checkpoint)."""

    def __init__(self, model: Any, processor: Any, device: torch.device) -> None:
        self.model = model
        self.processor = processor
        self.device = device

    @classmethod
    def load(
        cls, model: str, *, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> GroundingDetector:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        local = Path(model).expanduser()
        if (model.startswith(("/", ".", "~")) or local.exists()) and not local.is_dir():
            raise FileNotFoundError(
                f"detector directory {local} not found; download it with "
                "`llmseg fetch-weights --vlm IDEA-Research/grounding-dino-tiny`"
            )
        try:
            net = AutoModelForZeroShotObjectDetection.from_pretrained(model, dtype=torch.float32)
            processor = AutoProcessor.from_pretrained(model)
        except OSError as exc:
            raise FileNotFoundError(
                f"cannot load the detector {model!r} ({exc}); on an offline machine download it elsewhere "
                "and pass its directory"
            ) from exc
        return cls(net.to(device).eval(), processor, device)

    @torch.inference_mode()
    def detect(
        self, image: np.ndarray, phrase: str, *, box_threshold: float = 0.35, text_threshold: float = 0.25
    ) -> Detections:
        """Boxes for ``phrase`` in ``image`` ((H, W, 3) uint8 RGB)."""
        h, w = image.shape[:2]
        if not phrase:
            return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), [])
        text = phrase.lower().strip()
        if not text.endswith("."):
            text += "."
        max_len = int(getattr(self.model.config, "max_text_len", 256))
        inputs = self.processor(
            images=image,
            text=text,
            return_tensors="pt",
            truncation=True,
            max_length=max_len,
            input_data_format="channels_last",  # (H, W, 3) even when H or W is 3 or less
        ).to(self.device)
        outputs = self.model(**inputs)
        result = self.processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=box_threshold,
            text_threshold=text_threshold,
            target_sizes=[(h, w)],
        )[0]
        boxes = result["boxes"].float().cpu().numpy().reshape(-1, 4)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        labels = result.get("text_labels", result.get("labels", []))
        return Detections(
            boxes.astype(np.float32), result["scores"].float().cpu().numpy(), [str(x) for x in labels]
        )
