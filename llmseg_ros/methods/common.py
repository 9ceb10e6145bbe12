"""Pieces the methods share: SAM-encoded frames, the ``<SEG>`` VLM query, proposal-free results.

* :func:`prepare_sam_frame` / :func:`frame_sam_encoding` — the per-frame work of the
  SAM-prompting methods (``lisa``, ``grounded``, ``vlm_grounding``): SAM's image
  encoding, cached in the frame.
* :func:`trained_weights_and_vlm` / :func:`load_state` — the trained methods' (``llmseg``,
  ``lisa``) weights directory, checked against the method and the ``<SEG>`` VLM.
* :func:`cached_prefix` / :func:`query_seg_hidden` — the per-frame VLM image-prefix
  cache and the per-instruction ``<SEG>`` hidden state of the trained methods, with the
  optional generated answer (``explain``).
* :func:`proposal_free_result` — a :class:`SegmentResult` of a method without proposals.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llmseg_ros.methods.base import SegmentRequest
from llmseg_ros.types import FrameFeatures, Proposals, SegmentResult

if TYPE_CHECKING:
    from segment_anything.modeling import Sam
    from torch import nn

    from llmseg_ros.models.components import Components
    from llmseg_ros.models.sam_prompting import SamImageEncoding
    from llmseg_ros.models.vlm import SegVLM, VLMPrefix
    from llmseg_ros.weights.directory import LoadedWeights

SAM_KEY = "sam_encoding"
PREFIX_KEY = "seg_vlm_prefix"


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels (CUDA), so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_sam_frame(sam: Sam, image: np.ndarray, key: str = SAM_KEY) -> FrameFeatures:
    """A frame with no proposals whose cache holds SAM's image encoding under ``key``.

    Args:
        sam: the SAM model that will decode the masks.
        image: (H, W, 3) uint8 RGB.
    Returns:
        FrameFeatures with ``Proposals.empty(H, W)``, ``cache[key]`` the
        :class:`~llmseg_ros.models.sam_prompting.SamImageEncoding` and the ``sam_encoder`` time (s).
    """
    from llmseg_ros.models.sam_prompting import encode_image

    t0 = time.perf_counter()
    encoding = encode_image(sam, image)
    return FrameFeatures(
        image=image,
        proposals=Proposals.empty(int(image.shape[0]), int(image.shape[1])),
        timings={"sam_encoder": time.perf_counter() - t0},
        cache={key: encoding},
    )


def frame_sam_encoding(frame: FrameFeatures, method: str) -> SamImageEncoding:
    """The SAM encoding :func:`prepare_sam_frame` cached in ``frame``.

    Raises:
        ValueError: the frame was prepared by another method (no encoding in its cache).
    """
    encoding: SamImageEncoding | None = frame.cache.get(SAM_KEY)
    if encoding is None:
        raise ValueError(f"frame was not prepared by the {method} method (no SAM encoding)")
    return encoding


def trained_weights_and_vlm(components: Components, method: str) -> tuple[LoadedWeights, SegVLM]:
    """The trained weights of ``method`` and the ``<SEG>`` VLM (with their adapter) they run on.

    Raises:
        ValueError: the weights were trained for another method, or for a VLM of another
            hidden size.
    """
    weights = components.trained_weights()
    manifest = weights.manifest
    if manifest.method != method:
        raise ValueError(
            f"weights in {components.config.weights_dir} were trained for method "
            f"{manifest.method!r}, not {method!r}"
        )
    vlm = components.seg_vlm()
    if vlm.hidden_size != manifest.hidden_size:
        raise ValueError(
            f"VLM {components.config.vlm!r} has hidden size {vlm.hidden_size}, but the weights in "
            f"{components.config.weights_dir} expect {manifest.hidden_size} (trained on {manifest.base_vlm!r})"
        )
    return weights, vlm


def load_state(module: nn.Module, weights: LoadedWeights, key: str, where: object) -> None:
    """Load the ``key.*`` tensors of ``weights`` into ``module`` (the same keys and shapes).

    Raises:
        ValueError: the weights (in directory ``where``) hold no ``key.*`` tensors, or
            tensors that do not fit ``module`` (missing, unexpected or mis-shaped keys named).
    """
    from llmseg_ros.weights.directory import load_module_state

    state = weights.state_dicts.get(key)
    if state is None:
        raise ValueError(f"weights in {where} hold no '{key}.*' tensors")
    load_module_state(module, state, f"the '{key}.*' tensors of the weights in {where}")


def cached_prefix(
    vlm: SegVLM, frame: FrameFeatures, timings: dict[str, float], lock: threading.Lock
) -> VLMPrefix:
    """The VLM's image-prefix cache of ``frame``, encoded on first use (timed as ``vlm_prefix``).

    ``lock`` serialises the first encoding, so concurrent instructions on one frame
    encode it once.
    """
    with lock:
        prefix: VLMPrefix | None = frame.cache.get(PREFIX_KEY)
        if prefix is None:
            t0 = time.perf_counter()
            prefix = vlm.encode_prefix(frame.image)
            sync(vlm.device)
            timings["vlm_prefix"] = time.perf_counter() - t0
            frame.cache[PREFIX_KEY] = prefix
        return prefix


def query_seg_hidden(
    vlm: SegVLM,
    frame: FrameFeatures,
    request: SegmentRequest,
    timings: dict[str, float],
    lock: threading.Lock,
) -> tuple[str | None, torch.Tensor]:
    """The ``<SEG>`` hidden state for ``request`` on ``frame`` (and the answer when ``explain``).

    With ``request.explain`` the VLM generates its answer and the ``<SEG>`` state comes
    from the generated ``<SEG>`` token; when the answer has none (or without ``explain``)
    one teacher-forced pass gives it. Adds ``vlm_prefix`` (first use of the frame) and
    ``vlm`` to ``timings`` (s).

    Returns:
        (answer or ``None``, ``(hidden,)`` float hidden state on the VLM's device).
    """
    prefix = cached_prefix(vlm, frame, timings, lock)
    t0 = time.perf_counter()
    answer: str | None = None
    hidden: torch.Tensor | None = None
    if request.explain:
        answer, hidden = vlm.generate(
            prefix, request.instruction, history=request.history, is_sentence=request.is_sentence
        )
    if hidden is None:
        hidden = vlm.seg_hidden(
            prefix, request.instruction, is_sentence=request.is_sentence, history=request.history
        )
    sync(vlm.device)
    timings["vlm"] = time.perf_counter() - t0
    return answer, hidden


def proposal_free_result(
    method: str,
    mask: np.ndarray,
    confidence: float,
    *,
    answer: str | None,
    timings: dict[str, float],
    extras: dict[str, Any],
) -> SegmentResult:
    """The result of a method that selects no proposals (no ``selected`` / ``similarity`` / ``iop``).

    Args:
        method: the method's name.
        mask: (H, W) bool at the frame's resolution.
        confidence: in [0, 1].
    """
    return SegmentResult(
        mask=mask,
        selected=[],
        similarity=np.zeros(0, np.float32),
        iop=np.zeros(0, np.float32),
        confidence=confidence,
        num_proposals=0,
        method=method,
        answer=answer,
        timings=timings,
        extras=extras,
    )
