"""End-to-end ReasonSegmenter on the tiny profile, for every method, plus the weights
round trip and per-frame reuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmseg_ros.config import ConversationConfig, SelectionConfig
from llmseg_ros.pipeline import ReasonSegmenter
from llmseg_ros.types import FrameFeatures, SegmentResult

ALL_METHODS = ["llmseg", "lisa", "grounded", "vlm_grounding", "vlm_marks"]


def _check_result(result: SegmentResult, image: np.ndarray, method: str) -> None:
    assert result.method == method
    assert result.mask.shape == image.shape[:2] and result.mask.dtype == bool
    assert 0.0 <= result.confidence <= 1.0
    assert result.timings["total"] > 0
    for index in result.selected:
        assert 0 <= index < result.num_proposals


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_end_to_end(tiny_config_factory, scene_image, method: str) -> None:
    seg = ReasonSegmenter(tiny_config_factory(method))
    frame = seg.prepare(scene_image)
    result = seg.segment(frame, "something round I could roll across the floor")
    _check_result(result, scene_image, method)
    # a raw image is prepared on the fly and includes the preparation timings
    direct = seg.segment(scene_image, "something round I could roll across the floor")
    np.testing.assert_array_equal(direct.mask, result.mask)
    assert set(frame.timings) <= set(direct.timings)
    seg.close()
    assert not seg.is_loaded and seg.components.loaded == []


@pytest.mark.parametrize("method", ["llmseg", "lisa", "grounded"])
def test_square_and_tiny_frames(tiny_config_factory, method: str) -> None:
    """Square frames and frames of 3 pixels or less on a side (ambiguous for image
    processors that guess the channel axis) give a mask of the frame's size."""
    seg = ReasonSegmenter(tiny_config_factory(method))
    for shape in ((64, 64, 3), (3, 3, 3), (4, 8, 3), (2, 9, 3), (1, 1, 3)):
        image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
        _check_result(seg.segment(image, "the red thing"), image, method)
    seg.close()


def test_llmseg_scores_and_strategies(tiny_config_factory, scene_image) -> None:
    seg = ReasonSegmenter(tiny_config_factory("llmseg"))
    frame = seg.prepare(scene_image)
    k = len(frame.proposals)
    assert k > 0
    assert frame.mask_embeddings.shape == (k, 256)
    base = seg.segment(frame, "the red ball")
    assert base.similarity.shape == (k,) and base.iop.shape == (k,)
    assert ((base.iop >= 0) & (base.iop <= 1)).all()
    assert ((base.similarity >= -1 - 1e-5) & (base.similarity <= 1 + 1e-5)).all()
    # the union of the selected proposals is the mask
    expected = np.zeros(scene_image.shape[:2], bool)
    for i in base.selected:
        expected |= frame.proposals.masks[i]
    np.testing.assert_array_equal(base.mask, expected)
    top1 = seg.segment(frame, "the red ball", selection=SelectionConfig(strategy="top1_iou"))
    assert top1.selected == [int(np.argmax(top1.similarity))]
    nothing = seg.segment(frame, "the red ball", selection=SelectionConfig(iop_threshold=1.0))
    assert nothing.selected == [] and not nothing.mask.any()
    assert nothing.confidence == pytest.approx(1.0 - nothing.iop.max())


def test_frame_reuse_and_prefix_cache(tiny_config_factory, scene_image) -> None:
    seg = ReasonSegmenter(tiny_config_factory("llmseg"))
    frame = seg.prepare(scene_image)
    first = seg.segment(frame, "where could I put the dirty dishes?")
    assert "vlm_prefix" in first.timings  # the first instruction encodes the image prefix
    second = seg.segment(frame, "where could I put the dirty dishes?")
    assert "vlm_prefix" not in second.timings  # later ones reuse it
    np.testing.assert_allclose(second.similarity, first.similarity, atol=1e-5)
    np.testing.assert_allclose(second.iop, first.iop, atol=1e-5)
    # the cached path agrees with a fresh frame (no cache) on the same image
    fresh = seg.segment(scene_image, "where could I put the dirty dishes?")
    np.testing.assert_allclose(fresh.iop, first.iop, atol=1e-5)


def test_weights_round_trip_reproduces_outputs(tiny_config_factory, scene_image, tmp_path) -> None:
    """Save the loaded heads + adapter with save_weights, load them back: same outputs."""
    from llmseg_ros.weights.directory import load_weights, save_weights

    config = tiny_config_factory("llmseg")
    seg = ReasonSegmenter(config)
    method = seg.method
    frame = seg.prepare(scene_image)
    before = seg.segment(frame, "the green box")
    loaded = load_weights(config.weights_dir)
    # perturb the heads so the round trip is not trivially the tiny profile's files
    torch.manual_seed(1)
    with torch.no_grad():
        for p in method.selector.parameters():  # type: ignore[attr-defined]
            p.add_(0.05 * torch.randn_like(p))
    changed = seg.segment(frame, "the green box")
    assert not np.allclose(changed.iop, before.iop)
    save_weights(
        tmp_path / "w",
        loaded.manifest,
        {
            "projection": method.projection,  # type: ignore[attr-defined]
            "selector": method.selector,  # type: ignore[attr-defined]
            "mask_proj": method.mask_embedder.proj,  # type: ignore[attr-defined]
        },
        vlm=method.vlm,  # type: ignore[attr-defined]
    )
    reloaded = ReasonSegmenter(config.replace(weights_dir=str(tmp_path / "w")))
    again = reloaded.segment(reloaded.prepare(scene_image), "the green box")
    np.testing.assert_array_equal(again.similarity, changed.similarity)
    np.testing.assert_array_equal(again.iop, changed.iop)
    np.testing.assert_array_equal(again.mask, changed.mask)


def test_bad_requests(tiny_config_factory, scene_image) -> None:
    seg = ReasonSegmenter(tiny_config_factory("llmseg").replace(max_instruction_chars=20))
    with pytest.raises(ValueError, match="instruction is empty"):
        seg.segment(scene_image, "   ")
    with pytest.raises(ValueError, match="is 25 characters long; the limit is 20"):
        seg.segment(scene_image, "x" * 25)
    with pytest.raises(TypeError, match="instruction must be a string"):
        seg.segment(scene_image, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"must be \(H, W, 3\) uint8 RGB, got shape \(4, 4\)"):
        seg.prepare(np.zeros((4, 4), np.uint8))
    with pytest.raises(TypeError, match="must be a numpy array"):
        seg.prepare([[1, 2, 3]])  # type: ignore[arg-type]
    # still serving after bad requests
    assert isinstance(seg.prepare(scene_image), FrameFeatures)


@pytest.fixture(scope="module")
def llmseg(tiny_config_factory) -> ReasonSegmenter:
    """One loaded tiny llmseg segmenter shared by the conversation tests (distinct conversation ids)."""
    config = tiny_config_factory("llmseg")
    return ReasonSegmenter(config.replace(conversation=ConversationConfig(max_turns=4)))


@pytest.fixture(scope="module")
def llmseg_frame(llmseg) -> FrameFeatures:
    import cv2

    image = np.zeros((96, 128, 3), np.uint8)  # the scene_image fixture, built once for the module
    image[:] = np.linspace(40, 200, 128, dtype=np.uint8)[None, :, None]
    cv2.circle(image, (30, 40), 15, (220, 30, 30), -1)
    return llmseg.prepare(image)


def test_conversation_carries_turns_on_the_same_frame(llmseg, scene_image) -> None:
    seg = llmseg
    frame = seg.prepare(scene_image)
    seg.segment(frame, "which object is red?", conversation_id="c1")
    assert seg.conversation_history("c1", frame) == [("which object is red?", "It is <SEG>.")]
    follow = seg.segment(frame, "the one on the left", conversation_id="c1", explain=True)
    assert follow.answer is not None and follow.history_turns == 1 and follow.dropped_turns == 0
    assert [t[0] for t in seg.conversation_history("c1", frame)] == [
        "which object is red?",
        "the one on the left",
    ]
    # a new frame starts afresh
    other = seg.prepare(scene_image)
    assert seg.conversation_history("c1", other) == []


LONG = (
    "Where could I put the dirty dishes after dinner, given that the sink is full and the counter is cluttered? "
    * 5
)


def test_follow_ups_keep_the_prompt_within_the_vlm_context(llmseg, llmseg_frame, monkeypatch) -> None:
    """Regression: follow-ups grew the prompt past the VLM's context with success and no warning."""
    seg, frame = llmseg, llmseg_frame
    vlm = seg.method.vlm  # type: ignore[attr-defined]
    context = vlm.model.config.text_config.max_position_embeddings
    prompts: list[int] = []
    original = vlm.seg_hidden

    def measured(prefix, instruction, **kwargs):  # the prompt the model is given, counted by its public API
        text = vlm.build_conversation(
            instruction, history=kwargs.get("history"), is_sentence=kwargs.get("is_sentence")
        )
        prompts.append(len(vlm.expanded_input_ids(text, frame.image)))
        return original(prefix, instruction, **kwargs)

    monkeypatch.setattr(vlm, "seg_hidden", measured)
    results = [seg.segment(frame, f"{i}: {LONG}", conversation_id="dishes") for i in range(5)]
    assert len(prompts) == 5 and max(prompts) <= context, (prompts, context)
    assert prompts[-1] > context // 2  # the conversation still fills the context: only the oldest turns went
    last = results[-1]
    assert last.dropped_turns >= 1 and last.history_turns >= 1
    assert any(
        "so the prompt fits the VLM's context (" in w and f"of {context} tokens)" in w for w in last.warnings
    )
    kept = seg.conversation_history("dishes", frame)
    assert kept[-1][0] == f"4: {LONG.strip()}" and len(kept) == last.history_turns + 1
    assert results[0].warnings == [] and results[0].dropped_turns == 0


def test_conversation_keeps_at_most_max_turns_and_caps_the_id(llmseg, llmseg_frame) -> None:
    seg, frame = llmseg, llmseg_frame
    max_turns = seg.config.conversation.max_turns
    results = [seg.segment(frame, f"question {i}", conversation_id="capped") for i in range(max_turns + 2)]
    expected = [f"question {i}" for i in range(2, max_turns + 2)]
    assert [t[0] for t in seg.conversation_history("capped", frame)] == expected
    assert [r.history_turns for r in results] == [*range(max_turns + 1), max_turns]
    assert [r.dropped_turns for r in results] == [0] * max_turns + [1, 1]
    assert results[-1].warnings == [
        f"conversation 'capped': forgot its 1 oldest turn(s); it keeps the latest {max_turns} (conversation.max_turns)"
    ]
    limit = seg.config.conversation.max_id_chars
    with pytest.raises(
        ValueError, match=rf"conversation_id has 1048576 characters; the limit is {limit} \(conversation"
    ):
        seg.segment(frame, "a cup", conversation_id="c" * (1 << 20))
    with pytest.raises(ValueError, match="conversation_id holds a lone surrogate U\\+DC00"):
        seg.segment(frame, "a cup", conversation_id="c\udc00")
    with pytest.raises(ValueError, match="instruction holds a lone surrogate U\\+D800"):
        seg.segment(frame, "a cup \ud800", conversation_id="capped")
    with pytest.raises(TypeError, match="conversation_id must be a string, got int"):
        seg.segment(frame, "a cup", conversation_id=5)  # type: ignore[arg-type]
    assert [t[0] for t in seg.conversation_history("capped", frame)] == expected  # bad calls changed nothing
    with pytest.raises(ValueError, match="max_turns must be an integer >= 1, got 0"):
        ConversationConfig(max_turns=0)
    small = ReasonSegmenter(seg.config.replace(conversation=ConversationConfig(max_turns=2, max_id_chars=4)))
    assert small.config.conversation.max_turns == 2
    with pytest.raises(ValueError, match="conversation_id has 5 characters; the limit is 4"):
        small.segment(frame, "a cup", conversation_id="abcde")  # checked before any model is loaded
    assert not small.is_loaded


def record_input_lengths(chat) -> list[int]:
    """Make ``chat``'s model record the length of every input it generates from."""
    lengths: list[int] = []
    original = chat.model.generate

    def spy(**inputs):
        lengths.append(int(inputs["input_ids"].shape[1]))
        return original(**inputs)

    chat.model.generate = spy
    return lengths


@pytest.mark.parametrize("method", ["grounded", "vlm_grounding"])
def test_chat_prompt_count_is_what_the_chat_model_receives(tiny_config_factory, scene_image, method) -> None:
    """The chat-VLM prompt counter agrees with the input ids ChatVLM.generate gives its model."""
    from llmseg_ros.conversations import ChatVLMPrompt
    from llmseg_ros.methods.base import SegmentRequest
    from llmseg_ros.models.chat_vlm import ChatVLM
    from llmseg_ros.types import Proposals

    chat = ChatVLM.load(tiny_config_factory(method).vlm, device=torch.device("cpu"), dtype=torch.float32)
    lengths = record_input_lengths(chat)
    counter = ChatVLMPrompt(chat, lambda frame, text: (frame.image, f"Find: {text}"), max_new_tokens=1)
    frame = FrameFeatures(image=scene_image, proposals=Proposals.empty(*scene_image.shape[:2]))
    history = [("the red ball", "It is the ball on the left."), ("and the box?", "The green one.")]
    for turns in ([], history):
        request = SegmentRequest(instruction="something to sit on", history=turns)
        chat.generate(scene_image, "Find: something to sit on", max_new_tokens=1, history=turns)
        assert counter.count(frame, request) == lengths[-1] + 1
    assert lengths[1] > lengths[0]
    assert counter.context_tokens == chat.model.config.text_config.max_position_embeddings


@pytest.mark.slow
def test_chat_method_follow_ups_stay_within_the_context(tiny_config_factory, scene_image) -> None:
    """The same regression for a chat-VLM method (grounded: tiny LLaVA chat, 1024 tokens)."""
    seg = ReasonSegmenter(tiny_config_factory("grounded"))
    frame = seg.prepare(scene_image)
    chat = seg.method.chat_vlm  # type: ignore[attr-defined]
    budget = chat.model.config.text_config.max_position_embeddings - seg.method.max_new_tokens  # type: ignore[attr-defined]
    lengths = record_input_lengths(chat)
    results = [seg.segment(frame, f"{i}: {LONG}", conversation_id="c") for i in range(7)]
    assert len(lengths) == 7 and max(lengths) <= budget, (lengths, budget)
    assert results[-1].dropped_turns >= 1 and results[-1].warnings


def test_a_turn_without_text_is_remembered_with_the_answer_the_weights_were_taught(
    llmseg, llmseg_frame, monkeypatch
) -> None:
    from llmseg_ros.config import PromptFormat

    taught = PromptFormat(answer="Sure, <SEG>.")
    monkeypatch.setattr(llmseg.method.vlm, "prompt", taught)
    llmseg.segment(llmseg_frame, "which object is red?", conversation_id="taught")
    assert llmseg.conversation_history("taught", llmseg_frame) == [("which object is red?", "Sure, <SEG>.")]
