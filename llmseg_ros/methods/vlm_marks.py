"""``vlm_marks``: Set-of-Mark prompting over our proposals — the VLM names numbered regions.

Training-free: the proposal stage (SAM everything mode, the same one LLM-Seg uses)
gives K masks, largest first; the first ``max_marks`` are drawn on the frame as numbered
outlines (:func:`~llmseg_ros.methods.marks.render_marks`: label ``n`` marks proposal
``n - 1``); the chat VLM is asked which numbers answer the instruction; the numbers are
parsed (:func:`~llmseg_ros.methods.parsing.parse_mark_numbers`) and the union of those
proposals is the mask.

Zoomed second pass (``zoom_small=True``): when the frame has tiny regions
(:func:`~llmseg_ros.methods.marks.small_regions`), ``prepare`` also renders an enlarged
crop around (a group of) them with the same numbers. It is used when the first answer
names a tiny region or names none: the VLM is asked again on the crop, and its answer
decides the tiny regions (the first answer still decides the others). When the first
answer names only large regions, no second pass runs.

Frame cache (``FrameFeatures.cache``), filled by ``prepare``:
``"marks_image"`` — the marked (H, W, 3) uint8 RGB image (the debugging overlay: the
pipeline exposes it; ``SegmentResult.extras`` only holds JSON), ``"marks_layout"`` —
its :class:`~llmseg_ros.methods.marks.MarkLayout`, ``"marks_zoom_image"`` /
``"marks_zoom_layout"`` — the zoomed rendering or ``None``.

Confidence (``SegmentResult.confidence``): 0.0 when nothing is selected; otherwise the
share of the numbers the VLM named (in the deciding answers) that are marks on the image
— 1.0 for a clean answer, lower when it also named numbers that do not exist.
``similarity`` and ``iop`` are not produced by this method (zeros of length K).

``SegmentResult.extras``: ``raw_text`` (first answer), ``marks`` (final numbers),
``marks_first_pass``, ``raw_text_zoom`` / ``marks_zoom`` (second pass or ``None``),
``num_marks`` and ``label_to_proposal`` (label → proposal index, string keys).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from llmseg_ros.methods.base import SegmentRequest
from llmseg_ros.methods.marks import MarkLayout, render_marks, render_zoom, small_regions
from llmseg_ros.methods.parsing import mark_candidates, parse_mark_numbers
from llmseg_ros.types import FrameFeatures, Proposals, SegmentResult
from llmseg_ros.utils.imageio import check_rgb_image

if TYPE_CHECKING:
    from llmseg_ros.models.chat_vlm import ChatVLM

MARKS_IMAGE_KEY = "marks_image"
MARKS_LAYOUT_KEY = "marks_layout"
ZOOM_IMAGE_KEY = "marks_zoom_image"
ZOOM_LAYOUT_KEY = "marks_zoom_layout"


class ProposalSource(Protocol):
    """What the method needs from the proposal stage (``llmseg_ros.models.proposals.ProposalGenerator``)."""

    def generate(self, image: np.ndarray) -> Proposals: ...


def marks_prompt(instruction: str, count: int) -> str:
    """User turn for the full marked image (``count`` marks numbered 1..count)."""
    return (
        f"The image shows {count} numbered regions: each region is outlined in a colour and carries its "
        f"number (1 to {count}) on a small box inside it.\n"
        f'Instruction: "{instruction}"\n'
        "Which numbered regions answer the instruction? Think briefly, then end with a line "
        '"Answer: " followed by the numbers of all regions that answer it (for example "Answer: 3" or '
        '"Answer: 2, 7"), or "Answer: none" if no region does.'
    )


def zoom_marks_prompt(instruction: str, labels: list[int]) -> str:
    """User turn for the enlarged crop showing the small regions ``labels``."""
    listed = ", ".join(str(n) for n in labels)
    return (
        f"This is an enlarged part of the image. It shows the small numbered regions {listed}, each "
        "outlined in a colour with its number on a small box inside it.\n"
        f'Instruction: "{instruction}"\n'
        "Which of these numbered regions answer the instruction? Think briefly, then end with a line "
        '"Answer: " followed by their numbers, or "Answer: none" if none of them does.'
    )


class VLMMarksMethod:
    """Numbered proposals on the image → the VLM names the numbers (module docstring)."""

    name = "vlm_marks"

    def __init__(
        self,
        chat_vlm: ChatVLM,
        proposal_generator: ProposalSource,
        *,
        max_marks: int = 50,
        zoom_small: bool = True,
        max_new_tokens: int = 128,
    ) -> None:
        if max_marks < 1:
            raise ValueError(f"max_marks must be >= 1, got {max_marks}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.chat_vlm = chat_vlm
        self.proposal_generator = proposal_generator
        self.max_marks = max_marks
        self.zoom_small = zoom_small
        self.max_new_tokens = max_new_tokens

    # -- per frame --------------------------------------------------------------------------
    def render(self, image: np.ndarray, proposals: Proposals) -> dict[str, Any]:
        """The cache entries of a frame: marked image + layout, zoomed rendering (or None)."""
        count = min(len(proposals), self.max_marks)
        masks = proposals.masks[:count]
        marked, layout = render_marks(image, masks)
        entries: dict[str, Any] = {
            MARKS_IMAGE_KEY: marked,
            MARKS_LAYOUT_KEY: layout,
            ZOOM_IMAGE_KEY: None,
            ZOOM_LAYOUT_KEY: None,
        }
        if self.zoom_small and count:
            small = [i for i in small_regions(masks) if (i + 1) in layout.placements]
            zoom = render_zoom(image, masks, small, [i + 1 for i in small])
            if zoom is not None:
                entries[ZOOM_IMAGE_KEY], entries[ZOOM_LAYOUT_KEY] = zoom
        return entries

    @torch.inference_mode()
    def prepare(self, image: np.ndarray) -> FrameFeatures:
        """Proposals of the frame and their marked renderings (cached)."""
        check_rgb_image(image)
        t0 = time.perf_counter()
        proposals = self.proposal_generator.generate(image)
        t1 = time.perf_counter()
        if proposals.image_size != (image.shape[0], image.shape[1]):
            raise ValueError(
                f"proposal generator returned masks of size {proposals.image_size} for an image of size "
                f"{image.shape[:2]}; expected masks at the image's resolution"
            )
        frame = FrameFeatures(image=image, proposals=proposals)
        frame.cache.update(self.render(image, proposals))
        frame.timings = {"proposals": t1 - t0, "marks": time.perf_counter() - t1}
        return frame

    # -- per instruction --------------------------------------------------------------------
    def _ask(
        self, image: np.ndarray, prompt: str, valid: set[int], history: list[tuple[str, str]]
    ) -> tuple[str, list[int], list[int]]:
        """(answer, valid numbers named, every number named as a mark)."""
        output = self.chat_vlm.generate(image, prompt, max_new_tokens=self.max_new_tokens, history=history)
        return output.text, parse_mark_numbers(output.text, valid), mark_candidates(output.text)

    @torch.inference_mode()
    def segment(self, frame: FrameFeatures, request: SegmentRequest) -> SegmentResult:
        timings: dict[str, float] = {}
        if MARKS_LAYOUT_KEY not in frame.cache:
            t0 = time.perf_counter()
            frame.cache.update(self.render(frame.image, frame.proposals))
            timings["marks"] = time.perf_counter() - t0
        layout: MarkLayout = frame.cache[MARKS_LAYOUT_KEY]
        zoom_layout: MarkLayout | None = frame.cache.get(ZOOM_LAYOUT_KEY)
        k = len(frame.proposals)
        height, width = frame.image_size
        extras: dict[str, Any] = {
            "raw_text": "",
            "marks": [],
            "marks_first_pass": [],
            "raw_text_zoom": None,
            "marks_zoom": None,
            "num_marks": len(layout.placements),
            "label_to_proposal": {str(n): p for n, p in layout.labels.items()},
        }
        answer: str | None = None
        final: set[int] = set()
        named: list[int] = []
        if layout.placements:
            t0 = time.perf_counter()
            text, first, named = self._ask(
                frame.cache[MARKS_IMAGE_KEY],
                marks_prompt(request.instruction, len(layout.placements)),
                layout.valid_labels,
                list(request.history),
            )
            timings["vlm"] = time.perf_counter() - t0
            answer = text
            final = set(first)
            extras.update(raw_text=text, marks_first_pass=first)
            small = zoom_layout.valid_labels if zoom_layout is not None else set()
            if zoom_layout is not None and (not first or final & small):
                t0 = time.perf_counter()
                zoom_text, second, zoom_named = self._ask(
                    frame.cache[ZOOM_IMAGE_KEY],
                    zoom_marks_prompt(request.instruction, sorted(small)),
                    small,
                    [],
                )
                timings["vlm_zoom"] = time.perf_counter() - t0
                final = (final - small) | set(second)
                named = [n for n in named if n not in small] + zoom_named
                extras.update(raw_text_zoom=zoom_text, marks_zoom=second)
        marks = sorted(final)
        selected = layout.proposals_for(marks)
        mask = np.zeros((height, width), dtype=bool)
        if selected:
            mask = np.asarray(frame.proposals.masks[selected].any(axis=0), dtype=bool)
        confidence = 0.0
        if selected and named:
            confidence = float(sum(1 for n in named if n in layout.placements) / len(named))
        extras["marks"] = marks
        return SegmentResult(
            mask=mask,
            selected=selected,
            similarity=np.zeros((k,), dtype=np.float32),
            iop=np.zeros((k,), dtype=np.float32),
            confidence=confidence,
            num_proposals=k,
            method=self.name,
            answer=answer,
            timings=timings,
            extras=extras,
        )
