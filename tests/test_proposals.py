"""Proposal stage: the fast path against SAM's own automatic mask generator on the tiny SAM."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from segment_anything.utils.amg import batched_mask_to_box

from llmseg_ros.config import ProposalConfig
from llmseg_ros.models.amg.exact_decoder import SHARED_PREFIX_EXACT, ExactDecoder
from llmseg_ros.models.amg.factored_decoder import FactoredDecoder
from llmseg_ros.models.amg.postprocess import (
    PostProcessor,
    boxes_from_masks,
    pixel_counts,
    upsample_logits,
    window_extreme,
)
from llmseg_ros.models.proposals import (
    ProposalGenerator,
    downscale_long_side,
    mask_boxes_xyxy,
    resize_masks_nearest,
)
from llmseg_ros.tiny.sam import build_tiny_sam
from llmseg_ros.types import Proposals

WORST_CASE = {"pred_iou_thresh": -1e4, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}
# Score filters that keep many masks and drop many (no NMS), and the same with NMS.
MANY = {"pred_iou_thresh": 0.9, "stability_score_thresh": 0.9, "box_nms_thresh": 1.0}
MANY_NMS = {"pred_iou_thresh": 0.9, "stability_score_thresh": 0.9, "box_nms_thresh": 0.99}


def scene(height: int, width: int, seed: int) -> np.ndarray:
    """Shapes on a textured background, (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    background = rng.random((4, 4, 3)).astype(np.float32) * 60 + 80
    image = cv2.resize(background, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.uint8)
    for _ in range(5):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(max(2, height // 10), max(3, height // 3)))
        if rng.random() < 0.5:
            cv2.circle(image, (cx, cy), r, color, -1)
        else:
            cv2.rectangle(image, (cx - r, cy - r), (cx + r, cy + r // 2), color, -1)
    return image


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is faster, and much faster on a busy
    machine where OpenMP threads wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sam256():
    return build_tiny_sam(seed=0, image_size=256)


@pytest.fixture(scope="module")
def sam1024():
    return build_tiny_sam(seed=0, image_size=1024)


@pytest.fixture(params=["factored", "exact"])
def decoder(request) -> str:
    """The fast path's mask decoder under test."""
    return request.param


def run_both(sam, image, decoder="exact", **params) -> tuple[Proposals, Proposals]:
    params.setdefault("points_per_side", 8)
    ref = ProposalGenerator(sam, implementation="reference", **params).generate(image)
    fast = ProposalGenerator(sam, implementation="fast", decoder=decoder, **params).generate(image)
    return ref, fast


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(A, H, W) x (B, H, W) bool → (A, B) IoU."""
    fa = a.reshape(len(a), -1).astype(np.float64)
    fb = b.reshape(len(b), -1).astype(np.float64)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def assert_agree(ref: Proposals, fast: Proposals) -> None:
    """The factored decoder's contract: the same number of masks, and every mask of each
    side has a partner on the other side with mask IoU >= 0.99, the same predicted IoU
    (1e-5), stability score (1e-3) and prompt point (1e-4). Partners are not unique: one
    mask often comes from several points."""
    assert len(ref) == len(fast)
    assert ref.masks.shape == fast.masks.shape
    if not len(ref):
        return
    partner = (
        (mask_iou(ref.masks, fast.masks) >= 0.99)
        & (np.abs(ref.predicted_iou[:, None] - fast.predicted_iou[None, :]) <= 1e-5)
        & (np.abs(ref.stability_score[:, None] - fast.stability_score[None, :]) <= 1e-3)
        & (np.abs(ref.point_coords[:, None, :] - fast.point_coords[None, :, :]).max(axis=-1) <= 1e-4)
    )
    assert partner.any(axis=1).all(), (
        f"reference masks without a partner: {np.flatnonzero(~partner.any(axis=1))}"
    )
    assert partner.any(axis=0).all(), f"fast masks without a partner: {np.flatnonzero(~partner.any(axis=0))}"


def check(ref: Proposals, fast: Proposals, decoder: str) -> None:
    """Bit-for-bit equality for the exact decoder, agreement for the factored one."""
    if decoder == "exact":
        assert_same(ref, fast)
    else:
        assert_agree(ref, fast)


def assert_same(ref: Proposals, fast: Proposals) -> None:
    assert len(ref) == len(fast)
    assert ref.masks.shape == fast.masks.shape
    # Same set of masks, exact boolean equality (and in fact the same order).
    ref_keys = sorted(m.tobytes() for m in ref.masks)
    fast_keys = sorted(m.tobytes() for m in fast.masks)
    assert ref_keys == fast_keys
    np.testing.assert_array_equal(ref.masks, fast.masks)
    np.testing.assert_allclose(ref.predicted_iou, fast.predicted_iou, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ref.stability_score, fast.stability_score, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ref.boxes, fast.boxes)
    np.testing.assert_allclose(ref.point_coords, fast.point_coords, rtol=0, atol=1e-4)


def areas(p: Proposals) -> np.ndarray:
    return p.masks.reshape(len(p), -1).sum(axis=1)


# -- equality with SAM's generator --------------------------------------------------------


@pytest.mark.parametrize("size", [(96, 128), (75, 100)])
def test_worst_case_equals_reference(sam256, size, decoder):
    image = scene(*size, seed=1)
    ref, fast = run_both(sam256, image, decoder, max_proposals=1000, **WORST_CASE)
    assert len(ref) == 3 * 8 * 8  # every mask of every point survives
    check(ref, fast, decoder)


@pytest.mark.parametrize("size", [(96, 128), (192, 256)], ids=["upscaled", "encoder_size"])
@pytest.mark.parametrize("params", [WORST_CASE, MANY], ids=["worst_case", "many"])
def test_truncated_equals_reference(sam256, params, size, decoder):
    # Only masks that can be among the largest max_proposals are measured exactly; at the
    # encoder's size the bounds use the narrow window.
    image = scene(*size, seed=14)
    ref, fast = run_both(sam256, image, decoder, max_proposals=7, **params)
    assert len(ref) == 7
    check(ref, fast, decoder)


def test_worst_case_equals_reference_at_1024(sam1024, decoder):
    image = scene(120, 160, seed=2)
    ref, fast = run_both(sam1024, image, decoder, points_per_side=4, max_proposals=1000, **WORST_CASE)
    assert len(ref) == 3 * 4 * 4
    check(ref, fast, decoder)


@pytest.mark.parametrize(("seed", "params", "expected"), [(3, MANY, (40, 150)), (8, MANY_NMS, (5, 40))])
def test_many_survivors_equal_reference(sam256, seed, params, expected, decoder):
    image = scene(90, 120, seed=seed)
    ref, fast = run_both(sam256, image, decoder, max_proposals=1000, **params)
    assert expected[0] <= len(ref) <= expected[1]  # the filters keep many masks and drop many
    check(ref, fast, decoder)


def test_default_setting_equals_reference(sam1024, decoder):
    image = scene(120, 160, seed=5)
    ref, fast = run_both(sam1024, image, decoder, points_per_side=4)
    assert len(ref) >= 1
    check(ref, fast, decoder)


def test_odd_batches_equal_reference(sam256, decoder):
    # 49 points in batches of 10: the last batch is smaller and some batches have no mask
    # above the IoU threshold.
    image = scene(64, 80, seed=6)
    ref, fast = run_both(sam256, image, decoder, points_per_side=7, points_per_batch=10, pred_iou_thresh=0.99)
    check(ref, fast, decoder)


def test_decoder_without_shared_projections_equals_reference(sam256, monkeypatch):
    monkeypatch.setitem(SHARED_PREFIX_EXACT, sam256, False)
    image = scene(96, 128, seed=7)
    ref, fast = run_both(sam256, image, max_proposals=1000, **MANY)
    assert_same(ref, fast)


def decode_with_sam(sam, features, points):
    labels = torch.ones(points.shape[0], 1, dtype=torch.int)
    sparse, dense = sam.prompt_encoder(points=(points[:, None], labels), boxes=None, masks=None)
    masks, iou = sam.mask_decoder(features, sam.prompt_encoder.get_dense_pe(), sparse, dense, True)
    return iou, masks


def test_exact_decoder_is_bit_exact(sam256):
    sam = sam256
    features = torch.randn(1, 32, 16, 16)
    decoder = ExactDecoder(sam)
    ctx = decoder.context(features)
    points = torch.rand(12, 2, dtype=torch.float64) * 200
    every = lambda iou: torch.ones(iou.shape[0], dtype=torch.bool)  # noqa: E731
    with torch.inference_mode():
        iou, low_res, index = decoder(ctx, points, every)
        ref_iou, ref_masks = decode_with_sam(sam, features, points)
        skipped_iou, skipped, skipped_index = decoder(
            ctx, points, lambda iou: torch.zeros(iou.shape[0], dtype=torch.bool)
        )
    assert torch.equal(iou, ref_iou) and torch.equal(skipped_iou, ref_iou)
    assert torch.equal(low_res, ref_masks) and torch.equal(index, torch.arange(12))
    assert skipped.shape[0] == 0 and skipped_index.numel() == 0


@pytest.mark.parametrize("chunk", [1, 4, 5])
def test_factored_decoder_matches_sam_forward(sam256, chunk):
    # Same function as MaskDecoder.forward in another summation order; masks computed only
    # for the points the filter asks for, in increasing order.
    sam = sam256
    torch.manual_seed(3)
    features = torch.randn(1, 32, 16, 16)
    decoder = FactoredDecoder(sam, chunk=chunk)
    ctx = decoder.context(features)
    points = torch.rand(13, 2, dtype=torch.float64) * 250
    wanted = torch.tensor([i % 3 == 1 for i in range(13)])
    seen = []

    def some(iou):
        seen.append(iou.shape[0])
        start = sum(seen) - iou.shape[0]
        return wanted[start : start + iou.shape[0]]

    with torch.inference_mode():
        ref_iou, ref_masks = decode_with_sam(sam, features, points)
        iou, low_res, index = decoder(ctx, points, some)
        all_iou, all_masks, all_index = decoder(
            ctx, points, lambda iou: torch.ones(iou.shape[0], dtype=torch.bool)
        )
    assert max(seen) <= chunk
    scale = ref_masks.abs().max()
    torch.testing.assert_close(iou, ref_iou, rtol=0, atol=1e-5)
    assert torch.equal(index, torch.nonzero(wanted).flatten())
    torch.testing.assert_close(low_res, ref_masks[index], rtol=0, atol=1e-5 * scale)
    assert torch.equal(all_index, torch.arange(13))
    torch.testing.assert_close(all_masks, ref_masks, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(all_iou, ref_iou, rtol=0, atol=1e-5)


def test_factored_decoder_without_channels_last_head(sam256, monkeypatch):
    # A model whose upscaling head is not the two 2x2 transposed convolutions of SAM falls
    # back to the module's own forward.
    decoder = FactoredDecoder(sam256)
    monkeypatch.setattr(decoder, "_channels_last", False)
    features = torch.randn(1, 32, 16, 16)
    points = torch.rand(6, 2, dtype=torch.float64) * 250
    with torch.inference_mode():
        every = lambda iou: torch.ones(iou.shape[0], dtype=torch.bool)  # noqa: E731
        _, low_res, _ = decoder(decoder.context(features), points, every)
        _, ref_masks = decode_with_sam(sam256, features, points)
    torch.testing.assert_close(low_res, ref_masks, rtol=0, atol=1e-5 * ref_masks.abs().max())


# -- output contract ------------------------------------------------------------------------


def test_sorted_by_area_and_truncated(sam256):
    image = scene(96, 128, seed=8)
    params = {"points_per_side": 8, **WORST_CASE}
    full = ProposalGenerator(sam256, max_proposals=1000, decoder="exact", **params).generate(image)
    assert np.all(np.diff(areas(full)) <= 0)
    for impl, decoder in (("fast", "exact"), ("reference", "exact"), ("fast", "factored")):
        top = ProposalGenerator(
            sam256, max_proposals=5, implementation=impl, decoder=decoder, **params
        ).generate(image)
        assert len(top) == 5
        if decoder == "exact":
            np.testing.assert_array_equal(top.masks, full.masks[:5])
            np.testing.assert_array_equal(top.predicted_iou, full.predicted_iou[:5])
        else:
            assert np.all(np.diff(areas(top)) <= 0)
            assert_agree(full.subset(np.arange(5)), top)


def test_output_types_and_boxes(sam256):
    image = scene(96, 128, seed=9)
    p = ProposalGenerator(sam256, points_per_side=8, **MANY).generate(image)
    assert len(p) > 0
    assert p.masks.dtype == bool and p.masks.shape[1:] == (96, 128)
    for name in ("predicted_iou", "stability_score", "boxes", "point_coords"):
        assert getattr(p, name).dtype == np.float32
    np.testing.assert_array_equal(p.boxes, batched_mask_to_box(torch.from_numpy(p.masks)).numpy())
    assert np.all((p.point_coords >= 0) & (p.point_coords <= [128, 96]))
    assert np.all(p.stability_score >= 0.9) and np.all(p.predicted_iou > 0.9)


def test_long_side_downscale(sam256):
    image = scene(150, 200, seed=10)
    params = {"points_per_side": 6, "max_proposals": 1000, **MANY}
    ref, fast = run_both(sam256, image, max_long_side=100, **params)
    assert fast.masks.shape[1:] == (150, 200)
    assert_same(ref, fast)
    # Same as running on the INTER_AREA-downscaled image and resizing the masks back.
    small = cv2.resize(image, (100, 75), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(downscale_long_side(image, 100), small)
    on_small = ProposalGenerator(sam256, **params).generate(small)
    assert len(on_small) == len(fast) > 0
    np.testing.assert_array_equal(resize_masks_nearest(on_small.masks, (150, 200)), fast.masks)
    np.testing.assert_allclose(fast.point_coords, on_small.point_coords * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(fast.boxes, mask_boxes_xyxy(fast.masks))


def test_small_image_is_not_resized():
    image = scene(20, 30, seed=11)
    assert downscale_long_side(image, 30) is image


def test_empty_result(sam256):
    image = scene(64, 80, seed=12)
    for impl in ("fast", "reference"):
        p = ProposalGenerator(sam256, points_per_side=4, pred_iou_thresh=100.0, implementation=impl).generate(
            image
        )
        assert len(p) == 0
        assert p.masks.shape == (0, 64, 80) and p.boxes.shape == (0, 4)


@pytest.mark.parametrize(
    ("image", "error", "match"),
    [
        (np.zeros((10, 10, 3), dtype=np.float32), ValueError, r"uint8.*float32|float32.*\(10, 10, 3\)"),
        (np.zeros((10, 10), dtype=np.uint8), ValueError, r"\(10, 10\)"),
        (np.zeros((10, 10, 4), dtype=np.uint8), ValueError, r"\(10, 10, 4\)"),
        (np.zeros((0, 10, 3), dtype=np.uint8), ValueError, r"\(0, 10, 3\)"),
        ([[0, 0, 0]], TypeError, "list"),
    ],
)
def test_bad_input(sam256, image, error, match):
    generator = ProposalGenerator(sam256, points_per_side=2)
    with pytest.raises(error, match=match):
        generator.generate(image)


def test_bad_parameters(sam256):
    with pytest.raises(ValueError, match="implementation"):
        ProposalGenerator(sam256, implementation="turbo")
    with pytest.raises(ValueError, match="points_per_side"):
        ProposalGenerator(sam256, points_per_side=0)
    with pytest.raises(ValueError, match="CUDA"):
        ProposalGenerator(sam256, encoder_dtype="float16")
    with pytest.raises(ValueError, match="encoder_dtype"):
        ProposalGenerator(sam256, encoder_dtype="int8")
    with pytest.raises(ValueError, match=r"decoder must be one of \['factored', 'exact'\], got 'fast'"):
        ProposalGenerator(sam256, decoder="fast")


def test_from_config(sam256):
    cfg = ProposalConfig(points_per_side=5, max_proposals=7, implementation="reference", **MANY)
    generator = ProposalGenerator.from_config(sam256, cfg)
    assert generator.config == cfg and generator.implementation == "reference"
    image = scene(64, 64, seed=13)
    p = generator.generate(image)
    assert len(p) <= 7
    assert set(generator.last_timings) >= {"resize", "total"}
    fast = ProposalGenerator.from_config(sam256, ProposalConfig(points_per_side=5, max_proposals=7, **MANY))
    assert_same(p, fast.generate(image))
    assert set(fast.last_timings) >= {"image_encoder", "mask_decoder", "postprocess", "total"}


# -- helpers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 17, 23), (2, 1, 300), (1, 2**15 + 3, 2)])
def test_pixel_counts_equal_sum(shape):
    # Tall masks (over 2**15 rows) take the int32 column sums.
    masks = torch.from_numpy(np.random.default_rng(1).random(shape) > 0.3)
    masks[0, :, 0] = True
    counts = pixel_counts(masks)
    assert counts.dtype == torch.int32
    assert torch.equal(counts.long(), masks.sum(dim=(1, 2)))


def test_boxes_match_segment_anything():
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(rng.random((6, 17, 23)) > 0.97)
    masks[0] = False  # empty → [0, 0, 0, 0]
    masks[1] = False
    masks[1, 4, 9] = True  # single pixel
    expected = batched_mask_to_box(masks)
    assert torch.equal(boxes_from_masks(masks), expected)
    np.testing.assert_array_equal(mask_boxes_xyxy(masks.numpy()), expected.numpy().astype(np.float32))


@pytest.mark.parametrize("original", [(75, 100), (192, 256), (256, 256), (256, 150), (33, 256)])
def test_upsample_logits_equals_postprocess_masks(sam256, original):
    low = torch.randn(2, 3, 64, 64) * 10
    scale = 256 / max(original)
    input_size = (int(original[0] * scale + 0.5), int(original[1] * scale + 0.5))
    expected = sam256.postprocess_masks(low, input_size, original)
    got = upsample_logits(low.flatten(0, 1), 256, input_size, original).view(2, 3, *original)
    assert torch.equal(got, expected)


def test_resize_masks_nearest_matches_cv2():
    rng = np.random.default_rng(1)
    masks = rng.random((3, 7, 9)) > 0.5
    out = resize_masks_nearest(masks, (20, 25))
    for m, o in zip(masks, out):
        np.testing.assert_array_equal(
            o, cv2.resize(m.astype(np.uint8), (25, 20), interpolation=cv2.INTER_NEAREST) > 0
        )


@pytest.mark.parametrize("threads", [1, 2])
def test_upsample_logits_any_thread_count(sam256, threads):
    # PyTorch's bilinear kernel choice depends on the thread count and the channel count.
    torch.set_num_threads(threads)
    try:
        low = torch.randn(4, 3, 64, 64) * 10
        for original, input_size in (((75, 100), (192, 256)), ((192, 256), (192, 256))):
            expected = sam256.postprocess_masks(low, input_size, original).flatten(0, 1)
            for n in (12, 7, 1):
                got = upsample_logits(low.flatten(0, 1)[:n], 256, input_size, original)
                assert torch.equal(got, expected[:n])
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("original", "input_size"), [((75, 100), (192, 256)), ((192, 256), (192, 256)), ((40, 300), (34, 256))]
)
def test_count_bounds_hold(sam256, original, input_size):
    torch.manual_seed(0)
    # Smooth logits with sharp edges, like SAM's, plus a few noisy ones.
    low = torch.nn.functional.interpolate(torch.randn(6, 1, 4, 4), (64, 64), mode="bilinear")[:, 0] * 200
    low = torch.cat([low, torch.randn(2, 64, 64)])
    grid = torch.zeros((1, 2), dtype=torch.float64)
    post = PostProcessor(sam256, ProposalConfig(), grid, input_size, original)
    count = post._bounds(low)
    # The 2 x 2 window when the second resize is the identity, the wide one otherwise.
    assert post.window == ((0, 1) if original == input_size else (2, 3))
    logits = upsample_logits(low, 256, input_size, original)
    for t in (-1.0, 0.0, 1.0, 37.5):
        exact = (logits > t).sum(dim=(1, 2)).double()
        lower, upper = count(t)
        assert torch.all(lower <= exact) and torch.all(exact <= upper)
        assert torch.all(upper[:6] - lower[:6] < 0.6 * original[0] * original[1])  # informative when smooth


@pytest.mark.parametrize("window", [(2, 3), (0, 1)])
def test_window_extreme_matches_a_loop(window):
    before, after = window
    x = torch.randn(3, 11, 9)
    expected_max, expected_min = torch.empty_like(x), torch.empty_like(x)
    for i in range(11):
        for j in range(9):
            patch = x[:, max(0, i - before) : i + after + 1, max(0, j - before) : j + after + 1]
            expected_max[:, i, j] = patch.amax(dim=(1, 2))
            expected_min[:, i, j] = patch.amin(dim=(1, 2))
    assert torch.equal(window_extreme(x, largest=True, window=window), expected_max)
    assert torch.equal(window_extreme(x, largest=False, window=window), expected_min)
