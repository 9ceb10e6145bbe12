"""SAM 2's video predictor (transformers ``Sam2VideoModel``) as a streaming mask tracker.

One :class:`Sam2VideoPredictor` holds the model and its processor; each track has its own
:class:`Sam2VideoState` (a transformers ``Sam2VideoInferenceSession`` for one object). A
track starts from a binary mask on its first frame (SAM 2 turns it into a conditioning
frame of its memory bank); every later frame is streamed through the model, which
attends to the memory of the conditioning frame and of the latest frames.

A streaming session keeps every frame and every frame's memory by default, so memory
would grow without bound on a robot. After each frame the predictor drops what SAM 2
no longer reads: pixels of earlier frames, and memories and object pointers older than
``max(num_maskmem, max_object_pointers_in_encoder)`` frames.

Weights: a local directory or hub id of a SAM 2 video checkpoint in transformers format
(``facebook/sam2.1-hiera-tiny`` … ``-large``); ``llmseg_ros.tiny.sam2`` writes a tiny
random one for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import Sam2VideoModel, Sam2VideoProcessor

OBJECT_ID = 1


@dataclass
class Sam2VideoState:
    """One track's SAM 2 session.

    Attributes:
        session: the transformers inference session (one object, id ``OBJECT_ID``).
        frame_idx: index of the latest frame streamed into it.
        original_size: (H, W) of the frames.
    """

    session: Any
    frame_idx: int
    original_size: tuple[int, int]


class Sam2VideoPredictor:
    """Streams frames through SAM 2 for any number of independent tracks (module docstring).

    Args:
        model: a loaded ``Sam2VideoModel`` (eval mode).
        processor: its ``Sam2VideoProcessor``.
    """

    def __init__(self, model: Sam2VideoModel, processor: Sam2VideoProcessor) -> None:
        self.model = model
        self.processor = processor
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        config = model.config
        self.keep_frames = max(int(config.num_maskmem), int(config.max_object_pointers_in_encoder))

    @classmethod
    def load(
        cls, name_or_path: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Sam2VideoPredictor:
        """Load a SAM 2 video model and processor (local directory or hub id).

        Raises:
            ValueError: nothing loadable at ``name_or_path`` (the message names it).
        """
        from transformers import Sam2VideoModel, Sam2VideoProcessor

        try:
            model: Any = Sam2VideoModel.from_pretrained(name_or_path, dtype=dtype)
            processor = Sam2VideoProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"cannot load a SAM 2 video model from {name_or_path!r} (expected a transformers "
                f"Sam2VideoModel directory or hub id such as 'facebook/sam2.1-hiera-tiny'): {exc}"
            ) from exc
        model.requires_grad_(False)
        return cls(model.to(torch.device(device)).eval(), processor)

    def _pixels(self, image: np.ndarray) -> torch.Tensor:
        inputs = self.processor(images=image, device=self.device, return_tensors="pt")
        return inputs.pixel_values[0].to(self.device, self.dtype)

    def _forward(self, state: Sam2VideoState, image: np.ndarray) -> tuple[np.ndarray, float]:
        out = self.model(
            inference_session=state.session, frame_idx=state.frame_idx, frame=self._pixels(image)
        )
        logits = self.processor.post_process_masks(
            [out.pred_masks.float()], original_sizes=[list(state.original_size)], binarize=False
        )[0]
        mask = (logits[0, 0] > 0.0).cpu().numpy()
        return mask, float(out.object_score_logits.float().reshape(-1)[0])

    @torch.inference_mode()
    def start(self, image: np.ndarray, mask: np.ndarray) -> Sam2VideoState:
        """A new session whose first frame is ``image`` with the target ``mask`` ((H, W) bool)."""
        height, width = int(image.shape[0]), int(image.shape[1])
        if mask.shape != (height, width):
            raise ValueError(f"mask has shape {mask.shape}, but the image is {(height, width)} (H, W)")
        session = self.processor.init_video_session(inference_device=self.device, dtype=self.dtype)
        session.video_height, session.video_width = height, width
        self.processor.add_inputs_to_inference_session(
            inference_session=session,
            frame_idx=0,
            obj_ids=OBJECT_ID,
            input_masks=torch.as_tensor(np.asarray(mask, dtype=bool)),
        )
        state = Sam2VideoState(session=session, frame_idx=0, original_size=(height, width))
        self._forward(state, image)
        return state

    @torch.inference_mode()
    def step(self, state: Sam2VideoState, image: np.ndarray) -> tuple[np.ndarray, float]:
        """The target on the next frame.

        Args:
            image: (H, W, 3) uint8 RGB, the same size as the session's frames.
        Returns:
            (mask (H, W) bool, SAM 2's object score logit: > 0 when it sees the object).
        """
        if (int(image.shape[0]), int(image.shape[1])) != state.original_size:
            raise ValueError(
                f"image is {image.shape[:2]} but the session's frames are {state.original_size} (H, W)"
            )
        state.frame_idx += 1
        result = self._forward(state, image)
        self._prune(state)
        return result

    def _prune(self, state: Sam2VideoState) -> None:
        """Drop frames and memories SAM 2 will not read again (module docstring)."""
        session, now = state.session, state.frame_idx
        oldest = now - self.keep_frames
        for idx in [i for i in session.processed_frames if i < now]:
            del session.processed_frames[idx]
        for per_obj in session.output_dict_per_obj.values():
            outputs = per_obj["non_cond_frame_outputs"]
            for idx in [i for i in outputs if i < oldest]:
                del outputs[idx]
        for tracked in session.frames_tracked_per_obj.values():
            for idx in [i for i in tracked if i < oldest]:
                del tracked[idx]
