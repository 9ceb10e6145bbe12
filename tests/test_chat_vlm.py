"""ChatVLM on tiny random Qwen2.5-VL and LLaVA checkpoints, loaded through the real path."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmseg_ros.models.chat_vlm import ChatOutput, ChatVLM
from llmseg_ros.models.coords import qwen_input_size, smart_resize
from llmseg_ros.weights.directory import WeightsNotFoundError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    from llmseg_ros.tiny.qwen import save_tiny_qwen2_5_vl

    return save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen") / "qwen2_5_vl", seed=0)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    from llmseg_ros.tiny.vlm import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("llava") / "llava", seed=0)


@pytest.fixture(scope="module")
def qwen(qwen_dir) -> ChatVLM:
    return ChatVLM.load(str(qwen_dir), device=CPU, dtype=torch.float32)


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(height, width, 3), dtype=np.uint8)


def test_tiny_qwen_checkpoint_is_a_real_qwen2_5_vl(qwen_dir) -> None:
    from transformers import AutoConfig, AutoProcessor

    assert AutoConfig.from_pretrained(qwen_dir).model_type == "qwen2_5_vl"
    processor = AutoProcessor.from_pretrained(qwen_dir)
    tok = processor.tokenizer
    for token in (
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|endoftext|>",
    ):
        ids = tok(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == token
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text.endswith(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen_generate_matches_transformers_and_is_deterministic(qwen, qwen_dir) -> None:
    from PIL import Image
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    image = _image(90, 160)
    out = qwen.generate(image, "Where is the cup?", max_new_tokens=8)
    assert isinstance(out, ChatOutput) and isinstance(out.text, str)
    assert qwen.family == "qwen2_5_vl" and qwen.coordinate_convention == "absolute_resized"
    assert out.image_size == (90, 160)
    # the model's input size is the processor's smart_resize of the image
    assert out.input_size == qwen_input_size(90, 160, qwen.processor.image_processor) == (84, 140)
    assert out.input_size == smart_resize(90, 160, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 16)
    assert out.content_box is None
    assert qwen.generate(image, "Where is the cup?", max_new_tokens=8) == out

    # reference: the same request through transformers directly
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_dir).eval()
    processor = AutoProcessor.from_pretrained(qwen_dir)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the cup?"}]}
    ]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(images=[Image.fromarray(image)], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    expected = processor.tokenizer.decode(
        ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    ).strip()
    assert out.text == expected


def test_history_goes_before_the_new_turn(qwen) -> None:
    messages = qwen._messages("and the plate?", [("where is the cup?", "on the left")])
    text = qwen.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.count("<|image_pad|>") == 1
    first = text.index("where is the cup?")
    assert text.index("<|image_pad|>") < first < text.index("on the left") < text.index("and the plate?")
    out = qwen.generate(_image(64, 64), "and the plate?", max_new_tokens=4, history=[("where?", "here")])
    assert out.input_size == (56, 56)


def test_llava_pads_to_square_and_reports_the_content_box(llava_dir) -> None:
    llava = ChatVLM.load(str(llava_dir), device=CPU, dtype=torch.float32)
    assert llava.family == "llava" and llava.coordinate_convention == "relative_0_1" and llava.pads_to_square
    out = llava.generate(_image(90, 160), "Where is the cup?", max_new_tokens=6)
    # 160x160 square (35-px bands top and bottom) resized to 64x64: scale 0.4
    assert out.input_size == (64, 64)
    assert out.content_box == pytest.approx((0.0, 14.0, 64.0, 50.0))
    assert llava.generate(_image(90, 160), "Where is the cup?", max_new_tokens=6) == out
    square = llava.generate(_image(50, 50), "hi", max_new_tokens=2)
    assert square.content_box == pytest.approx((0.0, 0.0, 64.0, 64.0))


def test_convention_override(qwen_dir) -> None:
    vlm = ChatVLM.load(
        str(qwen_dir), device=CPU, dtype=torch.float32, coordinate_convention="normalized_1000"
    )
    assert vlm.coordinate_convention == "normalized_1000"
    with pytest.raises(ValueError, match="coordinate_convention must be one of"):
        ChatVLM.load(str(qwen_dir), device=CPU, dtype=torch.float32, coordinate_convention="pixels")


def test_missing_models_say_what_and_how(tmp_path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(WeightsNotFoundError, match="no such directory") as info:
        ChatVLM.load(str(missing), device=CPU, dtype=torch.float32)
    assert str(missing) in str(info.value) and "fetch-weights" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError, match=r"has no config\.json"):
        ChatVLM.load(str(tmp_path / "empty"), device=CPU, dtype=torch.float32)
    with pytest.raises(WeightsNotFoundError, match="llmseg fetch-weights --vlm someone/not-a-cached-model"):
        ChatVLM.load("someone/not-a-cached-model", device=CPU, dtype=torch.float32)


def test_quantization_checks(qwen_dir) -> None:
    with pytest.raises(ValueError, match="needs a CUDA device"):
        ChatVLM.load(str(qwen_dir), device=CPU, dtype=torch.float32, quantization="4bit")
    with pytest.raises(ValueError, match="quantization must be None or one of"):
        ChatVLM.load(str(qwen_dir), device=CPU, dtype=torch.float32, quantization="3bit")


def test_bad_requests(qwen) -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        qwen.generate(np.zeros((8, 8), np.uint8), "hi")
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        qwen.generate(_image(8, 8), "  ")
    with pytest.raises(TypeError, match="history must be a list"):
        qwen.generate(_image(8, 8), "hi", history=[("only one",)])
    with pytest.raises(ValueError, match="max_new_tokens"):
        qwen.generate(_image(8, 8), "hi", max_new_tokens=0)


def test_checkpoint_without_chat_template_is_refused() -> None:
    with pytest.raises(ValueError, match="has no chat template"):
        ChatVLM(
            object(), SimpleNamespace(chat_template=None), family="llava", device=CPU, dtype=torch.float32
        )
