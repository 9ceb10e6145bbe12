"""``llmseg import-weights``: tiny checkpoints in the authors' exact layouts, imported and run
through our pipeline, against a step-by-step computation of the authors' forward.

The reference functions below restate, with plain torch and the transformers / segment
anything classes the authors' code builds on, what their code does (LLM-Seg
``model/LISA.py``, ``model/transformer.py``, ``model/llava/llava_arch.py``,
``model/llava/mm_utils.py``, ``utils/dataset.py`` ``ValDataSet_ReasonSeg``,
``utils/sam_mask_reader.py``, ``validate_llmseg.py`` ``validate_threshold``,
``prepare_datasets/prepare_ReasonSeg.py``; LISA ``model/LISA.py``, ``chat.py``; torch.hub
DINOv2 ``vision_transformer.py``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmseg_ros.config import ProposalConfig, SegmenterConfig, SelectionConfig
from llmseg_ros.tiny.llava_v1 import (
    CLIP,
    CLIP_IMAGE,
    LORA_RANK,
    TEXT,
    authors_module_state,
    dinov2_hub_state,
    save_clip_vision,
    save_lisa_hf,
    save_llava_v1_base,
    save_llmseg_deepspeed,
)
from llmseg_ros.tiny.sam import save_tiny_sam
from llmseg_ros.tiny.vision import TINY_DINOV2_PATCH, save_tiny_dinov2
from llmseg_ros.weights.importer import REPORT_NAME, ImportOptions, import_weights

EMBED_SIZE = 112  # DINOv2 input (896 for the real model); 8 × 8 patches from a 4 × 4 pre-training grid
IMAGE_HW = (150, 209)  # SAM input 71 × 100 when truncated, 72 × 100 when rounded
MAX_LONG_SIDE = 100
PROPOSALS = ProposalConfig(
    points_per_side=4,
    pred_iou_thresh=-1e4,
    stability_score_thresh=0.0,
    max_proposals=20,
    max_long_side=MAX_LONG_SIDE,
    implementation="reference",
)
INSTRUCTION = "where could I throw away the rest of the food"
IMAGE_TOKEN_INDEX = -200  # the authors' placeholder id
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The authors' files (tiny) and their imports."""
    d = tmp_path_factory.mktemp("released")
    save_llava_v1_base(d / "base")
    save_clip_vision(d / "clip")
    save_tiny_sam(d / "sam.pth")
    save_tiny_dinov2(d / "dinov2")
    common = {"base_dir": d / "base", "clip_dir": d / "clip", "sam_path": d / "sam.pth"}
    save_llmseg_deepspeed(d / "ckpt_model", dinov2_dir=d / "dinov2", **common)
    save_lisa_hf(d / "lisa", **common)
    logs: list[str] = []
    import_weights(
        ImportOptions(
            "llmseg-deepspeed",
            d / "ckpt_model",
            d / "w_llmseg",
            base=d / "base",
            vision_tower=d / "clip",
            sam=d / "sam.pth",
            dinov2=d / "dinov2",
        ),
        log=logs.append,
    )
    import_weights(
        ImportOptions("lisa-hf", d / "lisa", d / "w_lisa", vision_tower=d / "clip"), log=logs.append
    )
    return {
        **{
            k: d / k
            for k in ("base", "clip", "sam.pth", "dinov2", "ckpt_model", "lisa", "w_llmseg", "w_lisa")
        },
        "root": d,
    }


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    h, w = IMAGE_HW
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = np.linspace(30, 220, w, dtype=np.uint8)[None, :, None]
    cv2.circle(img, (50, 60), 30, (220, 40, 40), -1)
    cv2.rectangle(img, (110, 30), (190, 110), (40, 200, 60), -1)
    return img


def _config(released: dict[str, Path], method: str) -> SegmenterConfig:
    return SegmenterConfig(
        method=method,
        sam_checkpoint=str(released["sam.pth"]),
        sam_model_type="tiny",
        dinov2=str(released["dinov2"]),
        weights_dir=str(released[f"w_{method}"]),
        device="cpu",
        dtype="float32",
        embed_size=EMBED_SIZE,
        proposals=PROPOSALS,
    )


def _state(released: dict[str, Path], kind: str) -> dict[str, torch.Tensor]:
    """The authors' module state (the very tensors in the files), as float32."""
    common = {"base_dir": released["base"], "clip_dir": released["clip"], "sam_path": released["sam.pth"]}
    dinov2 = {"dinov2_dir": released["dinov2"]} if kind == "llmseg" else {}
    state = authors_module_state(kind, **common, **dinov2)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


# -- the authors' prompt and tokens -----------------------------------------------------------


def authors_prompt(text: str) -> str:
    """ValDataSet_ReasonSeg's conversation (is_sentence) rendered by conv_llava_v1 (sep " ", sep2 "</s>")
    with use_mm_start_end's image replacement."""
    user = "<image>" + f"\n {text.strip()} Please output segmentation mask."
    user = user.replace("<image>", "<im_start><image><im_end>")
    return SYSTEM + " " + "USER: " + user + " " + "ASSISTANT: " + "[SEG]." + "</s>"


def authors_tokenizer(folder: Path, add_tokens: bool) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if add_tokens:  # init_tokenizer in validate_llmseg.py
        tokenizer.add_tokens("[SEG]")
        tokenizer.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    return tokenizer


def slow_tokenizer_ids(tokenizer: Any, text: str) -> list[int]:
    """``tokenizer(text).input_ids`` of transformers < 4.34's slow LLaMA tokenizer: the text is
    cut at the no-split tokens; tokens added with ``add_tokens`` (not AddedToken objects) strip
    the whitespace on both sides; each piece is encoded on its own; BOS first."""
    stripping = ("[SEG]", "<im_start>", "<im_end>")
    no_split = (*stripping, "<s>", "</s>", "<unk>")
    parts = re.split("(" + "|".join(re.escape(t) for t in no_split) + ")", text)
    for i, part in enumerate(parts):
        if part in stripping:
            parts[i - 1], parts[i + 1] = parts[i - 1].rstrip(), parts[i + 1].lstrip()
    ids = [tokenizer.bos_token_id]
    for i, part in enumerate(parts):
        if i % 2:
            ids.append(tokenizer.convert_tokens_to_ids(part))
        elif part:
            ids += tokenizer.encode(part, add_special_tokens=False)
    return ids


def tokenizer_image_token(prompt: str, tokenizer: Any) -> list[int]:
    """model/llava/mm_utils.py: chunks around <image>, BOS kept once, IMAGE_TOKEN_INDEX between."""
    chunks = [slow_tokenizer_ids(tokenizer, chunk) for chunk in prompt.split("<image>")]
    ids = [chunks[0][0]]
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids += chunk[1:]
    return ids


def check_prompt_tokens(vlm: Any, tokenizer: Any, image: np.ndarray) -> list[int]:
    """Our conversation text and expanded ids equal the authors' (their ids returned, with the
    IMAGE_TOKEN_INDEX placeholder where we put one token per image feature)."""
    prompt = authors_prompt(INSTRUCTION)
    assert vlm.build_conversation(INSTRUCTION, is_sentence=True) == prompt
    ref_ids = tokenizer_image_token(prompt, tokenizer)
    p = ref_ids.index(IMAGE_TOKEN_INDEX)
    n_image = (CLIP_IMAGE // 14) ** 2
    assert (
        vlm.expanded_input_ids(prompt, image)
        == ref_ids[:p] + [vlm.image_token_id] * n_image + ref_ids[p + 1 :]
    )
    return ref_ids


# -- the authors' LLaVA forward ----------------------------------------------------------------


class LoraLinear(torch.nn.Module):
    """peft 0.4's LoRA Linear in eval mode: W x + B A x · alpha / r."""

    def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.base, self.a, self.b, self.scale = base, a, b, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a.T @ self.b.T) * self.scale


def authors_llama(state: dict[str, torch.Tensor], lora: bool) -> Any:
    """LlavaLlamaForCausalLM's language model (transformers LlamaModel) with peft 0.4's LoRA on q/v."""
    from transformers import LlamaConfig, LlamaModel

    rows = state["model.embed_tokens.weight"].shape[0]
    llama = LlamaModel(LlamaConfig(vocab_size=rows, rms_norm_eps=1e-6, **TEXT)).eval()
    llama.load_state_dict(
        {k[len("model.") :]: v for k, v in state.items() if re.match(r"model\.(embed_tokens|layers|norm)", k)
         and "lora_" not in k and "inv_freq" not in k}
    )  # fmt: skip
    if lora:
        for i, layer in enumerate(llama.layers):
            for name in ("q_proj", "v_proj"):
                key = f"model.layers.{i}.self_attn.{name}"
                a, b = state[f"{key}.lora_A.default.weight"], state[f"{key}.lora_B.default.weight"]
                setattr(
                    layer.self_attn, name, LoraLinear(getattr(layer.self_attn, name), a, b, 16 / LORA_RANK)
                )
    return llama


def authors_clip(clip_state: dict[str, torch.Tensor]) -> Any:
    """CLIPVisionTower's transformers CLIPVisionModel."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip = CLIPVisionModel(
        CLIPVisionConfig(**CLIP, image_size=CLIP_IMAGE, patch_size=14, hidden_act="quick_gelu")
    )
    clip.load_state_dict(clip_state)
    return clip.eval()


def authors_seg_hidden(
    llama: Any, clip: Any, state: dict[str, torch.Tensor], ids: list[int], image: np.ndarray
) -> torch.Tensor:
    """LlavaLlamaForCausalLM: CLIP's penultimate patch tokens (CLIPImageProcessor, PIL) →
    mm_projector, spliced at IMAGE_TOKEN_INDEX (prepare_inputs_labels_for_multimodal), LLaMA;
    the last-layer state where the next token is [SEG] (LISA.py's seg_token_mask with its
    image offset)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(
        size={"shortest_edge": CLIP_IMAGE}, crop_size={"height": CLIP_IMAGE, "width": CLIP_IMAGE}
    )
    pixels = processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        patches = clip(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # select -2, "patch"
        features = patches[0] @ state["model.mm_projector.weight"].T + state["model.mm_projector.bias"]
        p = ids.index(IMAGE_TOKEN_INDEX)
        embed = llama.embed_tokens
        parts = [embed(torch.tensor(ids[:p])), features, embed(torch.tensor(ids[p + 1 :]))]
        hidden = llama(inputs_embeds=torch.cat(parts)[None]).last_hidden_state[0]
    # seg_token_mask = input_ids[1:] == [SEG], then shifted right by the image's extra tokens
    n_image = features.shape[0]
    seg_id = ids[-3]  # "... [SEG] . </s>"
    mask = [False] * (n_image - 1) + [t == seg_id for t in ids[1:]] + [False]
    positions = [i for i, m in enumerate(mask) if m]
    assert len(positions) == 1
    return hidden[positions[0]]


def text_hidden_fcs(state: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    x = hidden @ state["model.text_hidden_fcs.0.0.weight"].T + state["model.text_hidden_fcs.0.0.bias"]
    return (
        torch.relu(x) @ state["model.text_hidden_fcs.0.2.weight"].T + state["model.text_hidden_fcs.0.2.bias"]
    )


# -- the authors' DINOv2 (torch.hub dinov2_vitl14), pooling, fusion and heads ----------------------


def hub_dinov2_patch_tokens(w: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """forward_features(x)["x_norm_patchtokens"] of facebookresearch/dinov2's vision_transformer.py
    (``w``: the hub model's state dict)."""
    tokens = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=TINY_DINOV2_PATCH)
    tokens = tokens.flatten(2).transpose(1, 2)  # (1, N, C)
    tokens = torch.cat([w["cls_token"].expand(1, -1, -1), tokens], dim=1)
    # interpolate_pos_encoding: float, bicubic, scale factor (w0 + 0.1) / M, no antialias
    pos = w["pos_embed"].float()
    n = pos.shape[1] - 1
    m = int(math.sqrt(n))
    w0 = x.shape[-1] // TINY_DINOV2_PATCH
    patch_pos = F.interpolate(
        pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2),
        scale_factor=((w0 + 0.1) / m, (w0 + 0.1) / m),
        mode="bicubic",
        antialias=False,
    )
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])
    tokens = tokens + torch.cat([pos[:, :1], patch_pos], dim=1)
    blocks = sorted({int(k.split(".")[1]) for k in w if k.startswith("blocks.")})
    dim = tokens.shape[-1]
    for i in blocks:
        b = f"blocks.{i}."
        y = F.layer_norm(tokens, (dim,), w[b + "norm1.weight"], w[b + "norm1.bias"], eps=1e-6)
        qkv = (y @ w[b + "attn.qkv.weight"].T + w[b + "attn.qkv.bias"]).reshape(1, -1, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(1, -1, dim) @ w[b + "attn.proj.weight"].T + w[
            b + "attn.proj.bias"
        ]
        tokens = tokens + w[b + "ls1.gamma"] * y
        y = F.layer_norm(tokens, (dim,), w[b + "norm2.weight"], w[b + "norm2.bias"], eps=1e-6)
        y = (
            F.gelu(y @ w[b + "mlp.fc1.weight"].T + w[b + "mlp.fc1.bias"]) @ w[b + "mlp.fc2.weight"].T
            + w[b + "mlp.fc2.bias"]
        )
        tokens = tokens + w[b + "ls2.gamma"] * y
    tokens = F.layer_norm(tokens, (dim,), w["norm.weight"], w["norm.bias"], eps=1e-6)
    return tokens[0, 1:]  # (N, C)


def authors_dinov2_input(image: np.ndarray) -> torch.Tensor:
    """ValDataSet_ReasonSeg: ResizeLongestSide(image_size).apply_image, normalise, pad bottom-right."""
    from segment_anything.utils.transforms import ResizeLongestSide

    resized = ResizeLongestSide(EMBED_SIZE).apply_image(image)
    x = torch.from_numpy(resized).permute(2, 0, 1).contiguous().float()
    mean = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
    x = (x - mean) / std
    h, w = x.shape[-2:]
    return F.pad(x, (0, EMBED_SIZE - w, 0, EMBED_SIZE - h))[None]


def authors_sam_masks(sam_path: Path, image: np.ndarray) -> np.ndarray:
    """prepare_ReasonSeg.py (truncating downscale, SamAutomaticMaskGenerator) + SAM_Mask_Reader
    (sorted by area, largest first, at most 50 — here the config's max_proposals): (H', W', K)."""
    from segment_anything import SamAutomaticMaskGenerator

    from llmseg_ros.models.sam import build_sam

    h, w = image.shape[:2]
    scale = MAX_LONG_SIDE / max(w, h)
    small = cv2.resize(image, (int(w * scale), int(h * scale)), interpolation=cv2.INTER_AREA)
    generator = SamAutomaticMaskGenerator(
        build_sam("tiny", sam_path),
        points_per_side=PROPOSALS.points_per_side,
        pred_iou_thresh=PROPOSALS.pred_iou_thresh,
        stability_score_thresh=PROPOSALS.stability_score_thresh,
    )
    records = sorted(generator.generate(small), key=lambda r: r["area"], reverse=True)[
        : PROPOSALS.max_proposals
    ]
    return np.stack([r["segmentation"] for r in records], axis=-1).astype(np.uint8)


def attention(
    state: dict[str, torch.Tensor], p: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """model/transformer.py Attention (8 heads, downsample rate 1)."""

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ state[f"{p}.{name}.weight"].T + state[f"{p}.{name}.bias"]

    def heads(x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, 8, c // 8).transpose(1, 2)

    qh, kh, vh = heads(lin(q, "q_proj")), heads(lin(k, "k_proj")), heads(lin(v, "v_proj"))
    attn = torch.softmax(qh @ kh.permute(0, 1, 3, 2) / math.sqrt(qh.shape[-1]), dim=-1)
    out = (attn @ vh).transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)
    return lin(out, "out_proj")


def authors_fusion(
    state: dict[str, torch.Tensor], segs: torch.Tensor, text: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """LISA.py model_forward (inference): lisa_attention_layers, lisa_final_attn, heads;
    returns (similarity (K,), IoP (K,))."""

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), state[f"{name}.weight"], state[f"{name}.bias"])

    def mlp(x: torch.Tensor, name: str, i: int = 0, j: int = 2, act: Any = torch.relu) -> torch.Tensor:
        x = act(x @ state[f"{name}.{i}.weight"].T + state[f"{name}.{i}.bias"])
        return x @ state[f"{name}.{j}.weight"].T + state[f"{name}.{j}.bias"]

    queries, keys = segs[None], text[None, None]  # (1, K, D), (1, 1, D)
    for d in range(2):
        p = f"model.lisa_attention_layers.{d}"
        queries = norm(queries + attention(state, f"{p}.self_attn", queries, queries, queries), f"{p}.norm1")
        queries = norm(
            queries + attention(state, f"{p}.cross_attn_token_to_image", queries, keys, keys), f"{p}.norm2"
        )
        hidden = torch.relu(queries @ state[f"{p}.mlp.lin1.weight"].T + state[f"{p}.mlp.lin1.bias"])
        queries = norm(
            queries + hidden @ state[f"{p}.mlp.lin2.weight"].T + state[f"{p}.mlp.lin2.bias"], f"{p}.norm3"
        )
        keys = norm(
            keys + attention(state, f"{p}.cross_attn_image_to_token", keys, queries, queries), f"{p}.norm4"
        )
    queries = norm(
        queries + attention(state, "model.lisa_final_attn", queries, keys, keys), "model.lisa_norm_final_attn"
    )
    iop = torch.sigmoid(mlp(queries, "model.lisa_iou_head"))[0, :, 0]
    embedded = mlp(queries, "model.lisa_embedding_head")[0]
    similarity = (text / text.norm()) @ (embedded / embedded.norm(dim=-1, keepdim=True)).T
    return similarity, iop


# -- LLM-Seg ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_imported_llmseg_runs_exactly_the_authors_forward(
    released: dict[str, Path], image: np.ndarray
) -> None:
    from llmseg_ros.pipeline import ReasonSegmenter

    state = _state(released, "llmseg")
    seg = ReasonSegmenter(_config(released, "llmseg"))
    method: Any = seg.method
    vlm = method.vlm
    ref_ids = check_prompt_tokens(vlm, authors_tokenizer(released["base"], add_tokens=True), image)

    # [SEG] hidden state (LoRA applied) and text_hidden_fcs
    prefix = "model.vision_tower.vision_tower.vision_model."
    clip_state = {
        k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and "position_ids" not in k
    }
    ref_hidden = authors_seg_hidden(
        authors_llama(state, lora=True), authors_clip(clip_state), state, ref_ids, image
    )
    hidden = vlm.seg_hidden(image, INSTRUCTION, is_sentence=True)
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-4, atol=1e-4)
    ref_query = text_hidden_fcs(state, ref_hidden)
    with torch.inference_mode():
        query = method.projection(hidden[None])[0]
    torch.testing.assert_close(query, ref_query, rtol=1e-4, atol=1e-4)

    # DINOv2 features (torch.hub interpolation), lisa_dino_conv, 256 × 256 map
    # torch.hub's weights are the public float32 ones; the release holds their bfloat16 rounding
    # (its DeepSpeed bf16 engine's copy), which the import checked
    hub = dinov2_hub_state(released["dinov2"])
    for key, value in hub.items():
        assert torch.equal(value.to(torch.bfloat16).float(), state[f"model.visual_model_dinov2.{key}"])
    heads = json.loads((released["dinov2"] / "config.json").read_text())["num_attention_heads"]
    ref_tokens = hub_dinov2_patch_tokens(hub, authors_dinov2_input(image), heads)
    g = EMBED_SIZE // TINY_DINOV2_PATCH
    ref_features = ref_tokens.T.reshape(-1, g, g)
    torch.testing.assert_close(
        method.mask_embedder.backbone_features(image), ref_features, rtol=1e-4, atol=1e-4
    )
    conv = F.conv2d(
        ref_features[None], state["model.lisa_dino_conv.weight"], state["model.lisa_dino_conv.bias"]
    )
    ref_map = F.interpolate(conv, size=(256, 256), mode="bilinear", align_corners=False)[0]

    # proposals at SAM resolution, pooled as SAM_Mask_Reader + mask_pooling
    segs_origin = authors_sam_masks(released["sam.pth"], image)  # (h, w, K)
    frame = seg.prepare(image)
    h, w = segs_origin.shape[:2]
    assert (h, w) == (71, 100)  # truncated (rounding gives 72)
    np.testing.assert_array_equal(
        method.pooled_masks(frame.proposals), segs_origin.transpose(2, 0, 1).astype(bool)
    )
    side = max(h, w)
    square = np.pad(segs_origin.astype(np.float64), ((0, side - h), (0, side - w), (0, 0)))
    weights = (
        F.interpolate(
            torch.from_numpy(square).permute(2, 0, 1)[None],
            size=(256, 256),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )[0]
        .float()
        .flatten(1)
    )
    ref_embeddings = (weights @ ref_map.flatten(1).T) / (weights.sum(-1, keepdim=True) + 1e-8)
    torch.testing.assert_close(frame.mask_embeddings, ref_embeddings, rtol=1e-4, atol=1e-4)

    # fusion, IoU similarity and IoP, selection (validate_threshold: IoP > threshold)
    ref_similarity, ref_iop = authors_fusion(state, ref_embeddings, ref_query)
    ordered = np.sort(ref_iop.numpy())
    gaps = np.diff(ordered)
    threshold = float((ordered[gaps.argmax()] + ordered[gaps.argmax() + 1]) / 2)  # far from every IoP
    result = seg.segment(
        frame, INSTRUCTION, is_sentence=True, selection=SelectionConfig(iop_threshold=threshold)
    )
    np.testing.assert_allclose(result.similarity, ref_similarity.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(result.iop, ref_iop.numpy(), rtol=1e-4, atol=1e-4)
    ref_selected = [i for i in range(len(ref_iop)) if ref_iop[i] > threshold]
    assert 0 < len(ref_selected) < len(ref_iop) and result.selected == ref_selected
    union = (segs_origin[:, :, ref_selected].sum(-1) > 0).astype(np.uint8)
    ref_mask = (
        F.interpolate(torch.from_numpy(union)[None, None].float(), size=IMAGE_HW, mode="nearest")[0, 0] > 0
    )
    np.testing.assert_array_equal(result.mask, ref_mask.numpy())


@pytest.mark.slow
def test_import_accounts_for_every_tensor(released: dict[str, Path]) -> None:
    from llmseg_ros.weights.directory import load_weights

    report = json.loads((released["w_llmseg"] / REPORT_NAME).read_text())
    state = _state(released, "llmseg")
    assert sorted(t["key"] for t in report["tensors"]) == sorted(f"base_model.model.{k}" for k in state)
    kinds = {t["key"].removeprefix("base_model.model."): (t["kind"], t["note"]) for t in report["tensors"]}
    assert kinds["model.visual_model.image_encoder.pos_embed"] == ("frozen", "equal to sam.pth")
    assert kinds["model.visual_model_dinov2.blocks.0.attn.qkv.weight"] == ("frozen", "equal to dinov2")
    assert kinds["model.layers.0.self_attn.rotary_emb.inv_freq"] == (
        "derived",
        "equal to the recomputed values",
    )
    assert {"global_steps", "ds_config", "ds_version", "frozen_param_fragments"} <= set(report["bookkeeping"])
    loaded = load_weights(released["w_llmseg"])
    manifest = loaded.manifest
    assert (manifest.method, manifest.base_vlm, manifest.adapter) == ("llmseg", "./vlm", True)
    assert (manifest.prompt.answer, manifest.prompt.conversation, manifest.prompt.seg_token) == (
        "[SEG].",
        "llava_v1",
        "[SEG]",
    )
    assert (manifest.dinov2_pos_interpolation, manifest.sam_downscale, manifest.mask_pooling) == (
        "hub",
        "truncate",
        "sam",
    )
    assert manifest.lora == {
        "r": LORA_RANK,
        "alpha": 16,
        "dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"],
    }
    heads = loaded.state_dicts
    assert torch.equal(heads["selector"]["layers.1.cross_attn_query_to_mask.q_proj.weight"].float(),
                       state["model.lisa_attention_layers.1.cross_attn_image_to_token.q_proj.weight"])  # fmt: skip
    assert torch.equal(heads["selector"]["iop_head.2.weight"].float(), state["model.lisa_iou_head.2.weight"])
    assert torch.equal(
        heads["selector"]["iou_head.0.weight"].float(), state["model.lisa_embedding_head.0.weight"]
    )
    lisa = load_weights(released["w_lisa"]).manifest
    assert (lisa.method, lisa.adapter, lisa.prompt.answer) == ("lisa", False, "[SEG].")
    assert not (released["w_lisa"] / "adapter").exists()


# -- LISA ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_imported_lisa_runs_exactly_the_authors_forward(released: dict[str, Path], image: np.ndarray) -> None:
    from safetensors.torch import load_file
    from segment_anything.utils.transforms import ResizeLongestSide

    from llmseg_ros.models.sam import build_tiny_sam_architecture
    from llmseg_ros.pipeline import ReasonSegmenter

    state = _state(released, "lisa")
    seg = ReasonSegmenter(_config(released, "lisa"))
    method: Any = seg.method
    vlm = method.vlm
    ref_ids = check_prompt_tokens(vlm, authors_tokenizer(released["lisa"], add_tokens=False), image)

    # the merged LLaMA; the public CLIP the release leaves out
    clip_state = {
        k[len("vision_model.") :]: v
        for k, v in load_file(str(released["clip"] / "model.safetensors")).items()
    }
    ref_hidden = authors_seg_hidden(
        authors_llama(state, lora=False), authors_clip(clip_state), state, ref_ids, image
    )
    hidden = vlm.seg_hidden(image, INSTRUCTION, is_sentence=True)
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-4, atol=1e-4)
    pred_embedding = text_hidden_fcs(state, ref_hidden)

    # LISA.py evaluate: SAM image encoder, prompt encoder with text_embeds, mask decoder (single
    # mask), postprocess_masks to the frame; mask = logits > 0
    # the frozen encoders are the public float32 SAM (the release holds their bfloat16 rounding),
    # the mask decoder is the release's fine-tuned one
    sam = build_tiny_sam_architecture()
    public = torch.load(released["sam.pth"], weights_only=True)
    decoder = {
        k[len("model.visual_model.") :]: v
        for k, v in state.items()
        if k.startswith("model.visual_model.mask_decoder.")
    }
    sam.load_state_dict({**public, **decoder})
    resized = ResizeLongestSide(1024).apply_image(image)
    x = torch.from_numpy(resized).permute(2, 0, 1).contiguous().float()
    with torch.no_grad():
        embedding = sam.image_encoder(sam.preprocess(x[None]))
        sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
        sparse = torch.cat([sparse, pred_embedding[None, None]], dim=1)
        low_res, _ = sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        masks = F.interpolate(low_res, (1024, 1024), mode="bilinear", align_corners=False)
        masks = masks[..., : resized.shape[0], : resized.shape[1]]
        ref_logits = F.interpolate(masks, IMAGE_HW, mode="bilinear", align_corners=False)[0, 0]
    frame = seg.prepare(image)
    with torch.inference_mode():
        logits, _ = method.head(frame.cache["sam_encoding"], hidden[None])
    torch.testing.assert_close(logits[0], ref_logits, rtol=1e-3, atol=1e-3)
    result = seg.segment(frame, INSTRUCTION, is_sentence=True)
    decided = (ref_logits.abs() > 1e-2).numpy()  # away from the threshold
    np.testing.assert_array_equal(result.mask[decided], (ref_logits > 0).numpy()[decided])


# -- errors, dry run, the CLI, evaluation, the catalogue -------------------------------------


def test_unknown_keys_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt_model" / "global_step1"
    folder.mkdir(parents=True)
    module = {
        "base_model.model.model.embed_tokens.weight": torch.zeros(4, 2),
        "base_model.model.model.surprise.w": torch.zeros(1),
    }
    torch.save({"module": module, "global_steps": 1}, folder / "mp_rank_00_model_states.pt")
    (tmp_path / "ckpt_model" / "latest").write_text("global_step1")
    options = ImportOptions("llmseg-deepspeed", tmp_path / "ckpt_model", tmp_path / "out", base=tmp_path)
    with pytest.raises(
        ValueError,
        match=r"1 tensor\(s\) match no key of the llmseg-deepspeed format: base_model\.model\.model\.surprise\.w",
    ):
        import_weights(options, log=lambda line: None)
    assert not (tmp_path / "out").exists()


def test_a_malicious_deepspeed_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from llmseg_ros.cli import EXIT_USAGE, main

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    (tmp_path / "global_step1").mkdir()
    torch.save(
        {"module": {"x": torch.zeros(1)}, "lr_scheduler": Payload()},
        tmp_path / "global_step1" / "mp_rank_00_model_states.pt",
    )
    (tmp_path / "latest").write_text("global_step1")
    code = main(
        [
            "import-weights",
            "--format",
            "llmseg-deepspeed",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            "--base",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "refused" in err and "Traceback" not in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "o").exists()


def _lisa_copy(released: dict[str, Path], tmp_path: Path, drop: str) -> Path:
    copy = tmp_path / "lisa"
    import shutil

    shutil.copytree(released["lisa"], copy)
    index = json.loads((copy / "pytorch_model.bin.index.json").read_text())
    shard = copy / index["weight_map"].pop(drop)
    state = torch.load(shard, weights_only=True)
    del state[drop]
    torch.save(state, shard)
    (copy / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return copy


@pytest.mark.slow
@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("model.mm_projector.bias", r"no tensors for model\.multi_modal_projector\.linear_1\.bias"),
        (
            "model.text_hidden_fcs.0.2.weight",
            r"lacks trained head tensors \(our names\): projection\.2\.weight",
        ),
        (
            "model.layers.1.mlp.up_proj.weight",
            r"no tensors for model\.language_model\.layers\.1\.mlp\.up_proj\.weight",
        ),
    ],
)
def test_missing_keys_are_named(released: dict[str, Path], tmp_path: Path, drop: str, message: str) -> None:
    source = _lisa_copy(released, tmp_path, drop)
    with pytest.raises(ValueError, match=message):
        import_weights(
            ImportOptions("lisa-hf", source, tmp_path / "out", vision_tower=released["clip"]),
            log=lambda s: None,
        )


@pytest.mark.slow
def test_frozen_copies_that_differ_from_the_public_weights_are_refused(
    released: dict[str, Path], tmp_path: Path
) -> None:
    save_tiny_sam(tmp_path / "other_sam.pth", seed=1)
    options = ImportOptions(
        "llmseg-deepspeed",
        released["ckpt_model"],
        tmp_path / "out",
        base=released["base"],
        vision_tower=released["clip"],
        sam=tmp_path / "other_sam.pth",
    )
    with pytest.raises(ValueError, match=r"differs from .* the checkpoint's SAM is not that public SAM"):
        import_weights(options, log=lambda s: None)
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        import_weights(
            ImportOptions("lisa-hf", released["lisa"], released["w_lisa"], vision_tower=released["clip"])
        )


@pytest.mark.slow
def test_dry_run_prints_every_tensor_and_writes_nothing(
    released: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from llmseg_ros.cli import EXIT_OK, main

    argv = ["import-weights", "--format", "lisa-hf", str(released["lisa"]), "--out", str(tmp_path / "o")]
    assert main([*argv, "--vision-tower", str(released["clip"]), "--dry-run"]) == EXIT_OK
    out = capsys.readouterr().out
    keys = json.loads((released["lisa"] / "pytorch_model.bin.index.json").read_text())["weight_map"]
    lines = out.splitlines()
    for key in keys:
        assert any(line.startswith(f"{key} -> ") for line in lines), key
    assert "model.visual_model.mask_decoder.iou_token.weight -> heads: mask_decoder.iou_token.weight" in out
    assert "model.mm_projector.weight -> vlm: model.multi_modal_projector.linear_1.weight" in out
    assert "(identity) -> vlm: model.multi_modal_projector.linear_2.weight" in out
    assert "note: 54 frozen SAM tensors were dropped unverified" in out
    assert not (tmp_path / "o").exists()
    assert (
        main(["import-weights", "--format", "lisa-hf", str(released["lisa"]), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "--vision-tower" in capsys.readouterr().err


def _reasonseg(root: Path, image: np.ndarray) -> Path:
    val = root / "ReasonSeg" / "val"
    val.mkdir(parents=True)
    for i, (text, is_sentence) in enumerate([(INSTRUCTION, True), ("the green box", False)]):
        cv2.imwrite(str(val / f"img_{i}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        shapes = [{"label": "target", "points": [[110, 30], [190, 30], [190, 110], [110, 110]]}]
        (val / f"img_{i}.json").write_text(
            json.dumps({"text": [text], "is_sentence": is_sentence, "shapes": shapes})
        )
    return root / "ReasonSeg"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["llmseg", "lisa"])
def test_evaluate_runs_the_imported_weights(
    released: dict[str, Path], image: np.ndarray, tmp_path: Path, method: str
) -> None:
    import importlib.util
    import sys

    script = Path(__file__).resolve().parents[1] / "training" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("evaluate_imported", script)
    assert spec is not None and spec.loader is not None
    evaluate = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = evaluate
    spec.loader.exec_module(evaluate)
    root = _reasonseg(tmp_path, image)
    config = _config(released, method).to_dict()
    del config["weights_dir"]
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config))
    out = tmp_path / "report"
    argv = ["--dataset", "reasonseg", "--root", str(root), "--split", "val", "--config", str(config_file)]
    assert evaluate.main([*argv, "--weights", str(released[f"w_{method}"]), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    overall = report["splits"]["val"]["overall"]
    assert overall["n"] == 2 and all(0.0 <= overall[k] <= 1.0 for k in ("giou", "ciou"))
    assert report["config"]["weights_dir"] == str(released[f"w_{method}"])


@pytest.mark.slow
def test_fetch_weights_knows_the_released_checkpoints(
    released: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`llmseg fetch-weights --released NAME`: the files the import needs, then the import."""
    import shutil

    from llmseg_ros.cli import EXIT_OK, main
    from llmseg_ros.weights import catalog
    from llmseg_ros.weights.directory import load_weights

    stand_ins = {
        "JCdesu/LLM-Seg-deepspeed-10epoch": released["ckpt_model"],
        catalog.LLAVA_LIGHTNING_7B: released["base"],
        "xinlai/LISA-7B-v1": released["lisa"],
        catalog.CLIP_VIT_L14: released["clip"],
    }
    requested: list[tuple[str, tuple[str, ...]]] = []

    def fake_snapshot(repo: str, target: Path, patterns: tuple[str, ...]) -> Path:
        requested.append((repo, patterns))
        shutil.copytree(stand_ins[repo], target, dirs_exist_ok=True)
        return target

    monkeypatch.setattr(catalog, "snapshot", fake_snapshot)
    argv = ["fetch-weights", "--dir", str(tmp_path), "--no-sam", "--dinov2", ""]
    assert main([*argv, "--released", "llmseg-10epoch", "--released", "lisa-7b"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "ReasonSeg val gIoU 52.3 / cIoU 47.5" in out and "llmseg segment --weights" in out
    assert ("JCdesu/LLM-Seg-deepspeed-10epoch", catalog.DEEPSPEED_FILES) in requested  # no optimizer shards
    assert load_weights(tmp_path / "llmseg-10epoch").manifest.method == "llmseg"
    assert load_weights(tmp_path / "lisa-7b").manifest.method == "lisa"
    with pytest.raises(SystemExit):
        main([*argv, "--released", "llmseg-99epoch"])
