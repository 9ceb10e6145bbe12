"""SegVLM on a tiny random LLaVA saved to disk and loaded through the real loading code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llmseg_ros.config import LoraSettings
from llmseg_ros.models.prompts import SEG_TOKEN
from llmseg_ros.models.vlm import SegVLM, VLMPrefix
from llmseg_ros.tiny.vlm import IMAGE_SIZE, NUM_IMAGE_TOKENS, PATCH_SIZE, save_tiny_llava

CPU = torch.device("cpu")
INSTRUCTIONS = (
    "Where can I throw away the rest of the food?",
    "the red mug",
    "What could I stand on to reach the top shelf?",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("vlm") / "tiny_llava", seed=0)


@pytest.fixture(scope="module")
def vlm(tiny_dir: Path) -> SegVLM:
    return SegVLM.load(tiny_dir, device=CPU, dtype=torch.float32)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)


def _manual_hidden(vlm: SegVLM, image: np.ndarray, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the processor's own expansion + a plain full forward with all hidden states."""
    inputs = vlm.processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        out = vlm.model(**inputs, output_hidden_states=True)
    return inputs["input_ids"][0], out.hidden_states[-1][0]


# -- tokenizer and expansion ------------------------------------------------------------
def test_seg_is_one_added_special_token(vlm: SegVLM, tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(tiny_dir)
    assert SEG_TOKEN not in base.get_vocab()
    assert vlm.seg_token_id == len(base) == len(vlm.tokenizer) - 1
    assert vlm.tokenizer.encode(SEG_TOKEN, add_special_tokens=False) == [vlm.seg_token_id]
    ids = vlm.tokenizer.encode("It is <SEG>.", add_special_tokens=False)
    assert ids.count(vlm.seg_token_id) == 1
    assert vlm.tokenizer.convert_ids_to_tokens(vlm.seg_token_id) == SEG_TOKEN
    # Embeddings grew by exactly one row, initialised to the mean of the old rows.
    emb = vlm.model.get_input_embeddings().weight
    head = vlm.model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == len(vlm.tokenizer)
    torch.testing.assert_close(emb[vlm.seg_token_id], emb[: len(base)].mean(0))
    torch.testing.assert_close(head[vlm.seg_token_id], head[: len(base)].mean(0))


def test_padded_vocabulary_is_not_resized(tmp_path: Path) -> None:
    directory = save_tiny_llava(tmp_path / "padded", pad_vocab_to_multiple_of=64)
    vlm = SegVLM.load(directory, device=CPU, dtype=torch.float32)
    rows = vlm.model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows > len(vlm.tokenizer)
    assert vlm.seg_token_id == len(vlm.tokenizer) - 1 < rows


def test_image_token_expansion_matches_the_vision_tower(vlm: SegVLM, image: np.ndarray) -> None:
    text = vlm.build_conversation("the red mug")
    ids = vlm.expanded_input_ids(text, image)
    assert ids.count(vlm.image_token_id) == NUM_IMAGE_TOKENS == (IMAGE_SIZE // PATCH_SIZE) ** 2
    pixel_values = vlm.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = vlm.model.get_image_features(pixel_values=pixel_values).pooler_output
    assert features[0].shape == (NUM_IMAGE_TOKENS, vlm.hidden_size)
    # Our tokenisation is exactly the processor's.
    reference = vlm.processor(images=image, text=text)["input_ids"][0]
    assert ids == list(reference)


# -- conversation text ------------------------------------------------------------------
def test_conversation_format_and_history(vlm: SegVLM) -> None:
    text = vlm.build_conversation("the red mug")
    assert text == (
        "USER: <image>\nWhat is the red mug in this image? Please output segmentation mask. ASSISTANT: It is <SEG>."
    )
    history = [
        ("Where can I sit?", "It is <SEG>."),
        ("the lamp", "Sure, it is <SEG>. Because it gives light."),
    ]
    text = vlm.build_conversation("Where is the bin?", history=history)
    assert text.count("<image>") == 1 and text.index("<image>") < text.index("Where can I sit?")
    order = [
        "Where can I sit? Please output segmentation mask.",
        "ASSISTANT: It is <SEG>.",
        "What is the lamp in this image?",
        "ASSISTANT: Sure, it is <SEG>. Because it gives light.",
        "Where is the bin? Please output segmentation mask.",
    ]
    positions = [text.index(part) for part in order]
    assert positions == sorted(positions)
    assert text.endswith("ASSISTANT: It is <SEG>.")
    assert vlm.build_conversation("the red mug", answer=None).endswith("ASSISTANT:")


def test_fallback_format_without_chat_template(vlm: SegVLM) -> None:
    history = [("Where can I sit?", "It is <SEG>.")]
    with_template = vlm.build_conversation("the lamp", history=history)
    saved = vlm.processor.chat_template
    vlm.processor.chat_template = None
    try:
        without = vlm.build_conversation("the lamp", history=history)
    finally:
        vlm.processor.chat_template = saved
    assert without == with_template  # the LLaVA-1.5 format, written out by hand
    assert without.startswith("USER: <image>\nWhere can I sit?")


def test_bad_instructions_are_rejected(vlm: SegVLM, image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="image token"):
        vlm.build_conversation("look at <image> here")
    with pytest.raises(ValueError, match="must not contain <SEG>"):
        vlm.build_conversation("the <SEG> thing")
    with pytest.raises(ValueError, match="exactly once"):
        vlm.seg_hidden(image, "the cup", answer="It is here.")
    with pytest.raises(TypeError, match=r"history\[0\]"):
        vlm.build_conversation("the cup", history=[("only one",)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"shape \(H, W, 3\)"):
        vlm.seg_hidden(image[..., 0], "the cup")
    with pytest.raises(ValueError, match="uint8"):
        vlm.seg_hidden(image.astype(np.float32), "the cup")


# -- the <SEG> hidden state ---------------------------------------------------------------
@pytest.mark.parametrize(
    "history", [None, [("Where can I sit?", "It is <SEG>.")]], ids=["no_history", "history_with_seg"]
)
def test_seg_hidden_is_the_state_predicting_seg(vlm: SegVLM, image: np.ndarray, history: list | None) -> None:
    instruction = INSTRUCTIONS[0]
    ids, states = _manual_hidden(vlm, image, vlm.build_conversation(instruction, history=history))
    seg_id = vlm.tokenizer.convert_tokens_to_ids("<SEG>")
    seg_positions = (ids == seg_id).nonzero().flatten().tolist()
    assert len(seg_positions) == (1 if history is None else 2)
    pos = seg_positions[-1] - 1  # the answer's <SEG> is the last one
    assert int(ids[pos + 1]) == vlm.seg_token_id
    assert (ids == vlm.image_token_id).sum() == NUM_IMAGE_TOKENS
    hidden = vlm.seg_hidden(image, instruction, history=history)
    assert hidden.dtype == torch.float32 and hidden.shape == (vlm.hidden_size,)
    torch.testing.assert_close(hidden, states[pos], atol=1e-5, rtol=1e-5)
    # Off-by-one neighbours are different states: the test would catch a wrong offset.
    for other in (pos - 1, pos + 1):
        assert not torch.allclose(hidden, states[other], atol=1e-3)


def test_prefix_cache_matches_uncached_and_stays_reusable(vlm: SegVLM, image: np.ndarray) -> None:
    prefix = vlm.encode_prefix(image)
    assert isinstance(prefix, VLMPrefix)
    assert prefix.image_size == (48, 80)
    assert prefix.prefix_length == prefix.past_key_values.get_seq_length()
    assert int(prefix.input_ids[-1]) == vlm.image_token_id
    first = vlm.seg_hidden(prefix, INSTRUCTIONS[0])
    for instruction in INSTRUCTIONS:  # second and third instructions on the same prefix
        cached = vlm.seg_hidden(prefix, instruction)
        full = vlm.seg_hidden(image, instruction)
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
        assert prefix.past_key_values.get_seq_length() == prefix.prefix_length  # not mutated
    history = [("the lamp", "It is <SEG>.")]
    torch.testing.assert_close(
        vlm.seg_hidden(prefix, INSTRUCTIONS[1], history=history),
        vlm.seg_hidden(image, INSTRUCTIONS[1], history=history),
        atol=1e-5,
        rtol=1e-5,
    )
    assert torch.equal(vlm.seg_hidden(prefix, INSTRUCTIONS[0]), first)


TEXT_FIRST_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() + ': ' }}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endfor %}"
    "{% for c in m['content'] if c['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_template_with_text_before_image_has_no_prefix(tiny_dir: Path, image: np.ndarray) -> None:
    vlm = SegVLM.load(tiny_dir, device=CPU, dtype=torch.float32)
    vlm.processor.chat_template = TEXT_FIRST_TEMPLATE
    text = vlm.build_conversation("the red mug")
    assert text.startswith("USER: What is the red mug in this image?") and "<image>\n" in text
    ids, states = _manual_hidden(vlm, image, text)
    pos = int((ids == vlm.seg_token_id).nonzero()[-1]) - 1
    torch.testing.assert_close(vlm.seg_hidden(image, "the red mug"), states[pos], atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="instruction text before the image"):
        vlm.encode_prefix(image)


def test_prefix_of_another_model_is_rejected(vlm: SegVLM, tiny_dir: Path, image: np.ndarray) -> None:
    other = SegVLM.load(tiny_dir, device=CPU, dtype=torch.float32)
    with pytest.raises(ValueError, match="another SegVLM"):
        vlm.seg_hidden(other.encode_prefix(image), "the cup")


# -- generation ---------------------------------------------------------------------------
class _ScriptedHead(torch.nn.Module):
    """An LM head that makes greedy decoding emit a fixed token sequence."""

    def __init__(self, tokens: list[int], vocab: int) -> None:
        super().__init__()
        self.tokens, self.vocab, self.calls = tokens, vocab, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros((*hidden.shape[:-1], self.vocab))
        logits[..., self.tokens[min(self.calls, len(self.tokens) - 1)]] = 1.0
        self.calls += 1
        return logits


def test_generate_returns_text_and_the_seg_state(tiny_dir: Path, image: np.ndarray) -> None:
    vlm = SegVLM.load(tiny_dir, device=CPU, dtype=torch.float32)
    text, state = vlm.generate(image, "the red mug", max_new_tokens=6)
    assert isinstance(text, str) and (state is None or state.shape == (vlm.hidden_size,))
    assert vlm.generate(vlm.encode_prefix(image), "the red mug", max_new_tokens=6)[0] == text

    it_id = vlm.tokenizer.encode(" It", add_special_tokens=False)
    assert len(it_id) == 1
    vocab = vlm.model.get_output_embeddings().weight.shape[0]
    script = [
        it_id[0],
        vlm.seg_token_id,
        vlm.tokenizer.convert_tokens_to_ids("."),
        vlm.tokenizer.eos_token_id,
    ]
    vlm.model.lm_head = _ScriptedHead(script, vocab)
    text, state = vlm.generate(vlm.encode_prefix(image), "the red mug", max_new_tokens=10)
    assert text == "It<SEG>."
    assert state is not None
    # The state that predicted <SEG> is the last position of prompt + " It".
    prompt = vlm.build_conversation("the red mug", answer=None)
    inputs = vlm.processor(images=image, text=prompt, return_tensors="pt")
    ids = torch.cat([inputs["input_ids"], torch.tensor([[it_id[0]]])], dim=1)
    with torch.no_grad():
        ref = vlm.model.model(input_ids=ids, pixel_values=inputs["pixel_values"]).last_hidden_state[0, -1]
    torch.testing.assert_close(state, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        vlm.generate(image, "the cup", max_new_tokens=0)


# -- training -----------------------------------------------------------------------------
CONVERSATIONS = [
    ("Can you segment the cup in this image?", "Sure, it is <SEG>."),
    ("Where can I sit? Please output segmentation mask.", "<SEG>."),
]


@pytest.fixture
def trainable(tiny_dir: Path) -> SegVLM:
    return SegVLM.load(tiny_dir, device=CPU, dtype=torch.float32, trainable=True, lora=LoraSettings(r=4))


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [
        rng.integers(0, 256, (48, 80, 3), dtype=np.uint8),
        rng.integers(0, 256, (70, 30, 3), dtype=np.uint8),
    ]


def test_lora_targets_language_model_only(trainable: SegVLM) -> None:
    names = [n for n, p in trainable.model.named_parameters() if p.requires_grad]
    lora = [n for n in names if "lora_" in n]
    assert lora and all("language_model" in n and ("q_proj" in n or "v_proj" in n) for n in lora)
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in names)
    assert any("embed_tokens.modules_to_save" in n for n in names)
    assert any("lm_head.modules_to_save" in n for n in names)
    assert set(names) == {n for n in names if "lora_" in n or "modules_to_save" in n}


def test_training_forward_loss_and_gradients(trainable: SegVLM) -> None:
    loss, seg, batch_index = trainable.training_forward(_images(), CONVERSATIONS)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert seg.shape == (2, trainable.hidden_size) and seg.dtype == torch.float32
    assert batch_index.tolist() == [0, 1]
    (loss + seg.pow(2).mean()).backward()
    params = dict(trainable.model.named_parameters())
    for name, param in params.items():
        if not param.requires_grad:
            assert param.grad is None, name
        elif "lora_A" not in name:  # lora_A gets zero gradient while lora_B is still zero
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is not None, name


def test_training_forward_matches_reference_loss_and_padding(trainable: SegVLM) -> None:
    trainable.model.eval()  # no LoRA dropout: batch vs single must agree
    images = _images()
    with torch.no_grad():
        _, seg_b, _ = trainable.training_forward(images, CONVERSATIONS)
        singles = [trainable.training_forward([img], [conv]) for img, conv in zip(images, CONVERSATIONS)]
    for b, (_, seg_1, index_1) in enumerate(singles):
        assert index_1.tolist() == [0]
        torch.testing.assert_close(seg_b[b], seg_1[0], atol=1e-5, rtol=1e-5)
    # Reference loss: HF's own loss with labels on the answer tokens + EOS only.
    user, answer = CONVERSATIONS[1]
    prompt = trainable.conversation.render([], user, None)
    prompt_ids = trainable.processor(images=images[1], text=prompt)["input_ids"][0]
    full = trainable.processor(images=images[1], text=f"{prompt} {answer}", return_tensors="pt")
    ids = torch.cat([full["input_ids"], torch.tensor([[trainable.tokenizer.eos_token_id]])], dim=1)
    labels = ids.clone()
    labels[0, : len(prompt_ids)] = -100
    answer_tokens = trainable.tokenizer.convert_ids_to_tokens(labels[0][labels[0] != -100].tolist())
    assert answer_tokens == ["Ġ", "<SEG>", ".", "</s>"]  # byte-level BPE keeps the space apart
    with torch.no_grad():
        ref = trainable.model(input_ids=ids, pixel_values=full["pixel_values"], labels=labels).loss
    torch.testing.assert_close(singles[1][0], ref, atol=1e-5, rtol=1e-5)


def test_training_forward_rejects_bad_batches(trainable: SegVLM) -> None:
    with pytest.raises(ValueError, match="equal length"):
        trainable.training_forward(_images(), CONVERSATIONS[:1])
    with pytest.raises(TypeError, match="conversations"):
        trainable.training_forward(_images()[:1], ["just text"])  # type: ignore[list-item]


def test_adapter_round_trip_is_exact(trainable: SegVLM, tiny_dir: Path, tmp_path: Path) -> None:
    loss, seg, _ = trainable.training_forward(_images(), CONVERSATIONS)
    (loss + seg.pow(2).mean()).backward()
    torch.optim.SGD([p for p in trainable.model.parameters() if p.requires_grad], lr=0.5).step()
    trainable.model.eval()
    image = _images()[0]
    expected = trainable.seg_hidden(image, "the red mug")
    base = SegVLM.load(tiny_dir, device=CPU, dtype=torch.float32)
    assert not torch.allclose(base.seg_hidden(image, "the red mug"), expected)  # training changed it

    target = tmp_path / "weights" / "adapter"
    trainable.save_adapter(target)
    trainable.save_adapter(target)  # replacing an existing adapter works too
    assert sorted(p.name for p in target.parent.iterdir()) == ["adapter"]  # no temporary left behind
    loaded = SegVLM.load(tiny_dir, device=CPU, dtype=torch.float32, adapter_dir=target)
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert torch.equal(loaded.seg_hidden(image, "the red mug"), expected)
    prefix = loaded.encode_prefix(image)
    torch.testing.assert_close(loaded.seg_hidden(prefix, "the red mug"), expected, atol=1e-5, rtol=1e-5)


def test_save_adapter_needs_an_adapter(vlm: SegVLM, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no adapter to save"):
        vlm.save_adapter(tmp_path / "adapter")


# -- loading errors -----------------------------------------------------------------------
def test_missing_model_paths_are_reported(tmp_path: Path, tiny_dir: Path) -> None:
    missing = tmp_path / "no_such_llava"
    with pytest.raises(
        FileNotFoundError, match=r"VLM directory .*no_such_llava does not exist.*fetch-weights"
    ):
        SegVLM.load(missing, device=CPU, dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        SegVLM.load(tmp_path, device=CPU, dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        SegVLM.load(tiny_dir, device=CPU, dtype=torch.float32, adapter_dir=tmp_path / "no_adapter")


def test_hub_id_offline_is_reported() -> None:
    with pytest.raises(FileNotFoundError, match=r"could not load the VLM 'no-such-org/no-such-llava'"):
        SegVLM.load("no-such-org/no-such-llava", device=CPU, dtype=torch.float32)


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantization_needs_cuda(tiny_dir: Path, mode: str) -> None:
    with pytest.raises(ValueError, match=f"quantization='{mode}' needs a CUDA device"):
        SegVLM.load(tiny_dir, device=CPU, dtype=torch.float32, quantization=mode)


def test_unknown_quantization_is_rejected(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="quantization must be None or one of"):
        SegVLM.load(tiny_dir, device=CPU, dtype=torch.float32, quantization="3bit")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_load_on_cuda(tiny_dir: Path, image: np.ndarray, mode: str) -> None:
    pytest.importorskip("bitsandbytes")
    cuda = torch.device("cuda")
    vlm = SegVLM.load(tiny_dir, device=cuda, dtype=torch.float16, quantization=mode)
    llava = vlm.model
    assert type(llava.model.language_model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
    assert isinstance(llava.lm_head, torch.nn.Linear) and llava.lm_head.weight.dtype == torch.float16
    assert type(llava.model.vision_tower.vision_model.encoder.layers[0].self_attn.q_proj) is torch.nn.Linear
    hidden = vlm.seg_hidden(image, "the red mug")
    assert hidden.shape == (vlm.hidden_size,) and torch.isfinite(hidden).all()


# -- the tiny checkpoint ------------------------------------------------------------------
def test_tiny_llava_is_deterministic(tmp_path: Path, tiny_dir: Path) -> None:
    again = save_tiny_llava(tmp_path / "again", seed=0)
    other = save_tiny_llava(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes()
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
    tokens = SegVLM.load(again, device=CPU, dtype=torch.float32).tokenizer.tokenize(" the cup in this image")
    assert len(tokens) == 5  # common words are single tokens


# -- the authors' llava_v1 conversation -------------------------------------------------------
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@pytest.fixture(scope="module")
def llava_v1(tiny_dir: Path):
    """The tiny processor with the authors' added tokens, in the llava_v1 format."""
    from transformers import AutoProcessor

    from llmseg_ros.config import AUTHORS_PROMPT
    from llmseg_ros.models.vlm.conversation import LlavaV1Format

    processor = AutoProcessor.from_pretrained(tiny_dir)
    processor.tokenizer.add_tokens("[SEG]")
    processor.tokenizer.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    return LlavaV1Format(processor, device=CPU, dtype=torch.float32, prompt=AUTHORS_PROMPT)


def test_llava_v1_text_is_the_authors(llava_v1) -> None:
    """LLM-Seg / LISA validation: conv_llava_v1, "<image>\\n {text} Please output segmentation
    mask." with <im_start>/<im_end> around the image, the answer "[SEG]." then "</s>"."""
    text = llava_v1.build("  where is the mug  ", is_sentence=True)
    assert text == (
        f"{LLAVA_V1_SYSTEM} USER: <im_start><image><im_end>\n where is the mug Please output segmentation mask. "
        "ASSISTANT: [SEG].</s>"
    )
    assert llava_v1.build("the mug", is_sentence=False, answer=None).endswith(
        "\n What is the mug in this image? Please output segmentation mask. ASSISTANT:"
    )
    history = llava_v1.build("and the cup?", is_sentence=True, history=[("the mug", "[SEG].")])
    assert history.endswith(
        "What is the mug in this image? Please output segmentation mask. ASSISTANT: [SEG].</s>"
        "USER: and the cup? Please output segmentation mask. ASSISTANT: [SEG].</s>"
    )


def test_llava_v1_tokens_are_cut_like_the_authors_tokenizer(llava_v1) -> None:
    """tokenizer_image_token with their slow tokenizer: BOS once, pieces encoded on their own, the
    whitespace next to [SEG] / <im_start> / <im_end> dropped, one image token per feature."""
    tok = llava_v1.tokenizer
    text = llava_v1.build("where is the mug", is_sentence=True)
    ids = llava_v1.input_ids(text, "<image>" * 5)

    def enc(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False)

    image_id = tok.convert_tokens_to_ids("<image>")
    expected = (
        [tok.bos_token_id]
        + enc(f"{LLAVA_V1_SYSTEM} USER:")
        + [tok.convert_tokens_to_ids("<im_start>")]
        + [image_id] * 5
        + [tok.convert_tokens_to_ids("<im_end>")]
        + enc("where is the mug Please output segmentation mask. ASSISTANT:")
        + [tok.convert_tokens_to_ids("[SEG]")]
        + enc(".")
        + [tok.eos_token_id]
    )
    assert ids == expected
    with pytest.raises(ValueError, match="is for inference"):
        llava_v1.encode(text, "<image>")


def test_llava_v1_needs_the_authors_tokens(tiny_dir: Path) -> None:
    from llmseg_ros.config import AUTHORS_PROMPT

    with pytest.raises(ValueError, match=r"needs the tokens \['<im_start>', '<im_end>'\]"):
        SegVLM.load(tiny_dir, device=CPU, dtype=torch.float32, prompt=AUTHORS_PROMPT)
    with pytest.raises(ValueError, match="training uses the llava15 conversation format"):
        SegVLM.load(tiny_dir, device=CPU, dtype=torch.float32, prompt=AUTHORS_PROMPT, trainable=True)


def test_the_prompt_format_sets_the_teacher_forced_answer(tiny_dir: Path, image: np.ndarray) -> None:
    from llmseg_ros.config import PromptFormat

    sure = SegVLM.load(tiny_dir, device=CPU, dtype=torch.float32, prompt=PromptFormat(answer="Sure, <SEG>."))
    assert sure.build_conversation("the mug").endswith("ASSISTANT: Sure, <SEG>.")
    default = sure.seg_hidden(image, "the mug")
    torch.testing.assert_close(default, sure.seg_hidden(image, "the mug", answer="Sure, <SEG>."))
    assert not torch.allclose(default, sure.seg_hidden(image, "the mug", answer="It is <SEG>."))
