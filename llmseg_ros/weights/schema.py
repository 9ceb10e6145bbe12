"""Key schemas of the published checkpoints: every key of the authors' state dicts, where
it comes from in their code, and where it goes in ours (``docs/weights_formats.md``).

A rule matches a whole key (after the format's prefix: ``base_model.model.`` for the
peft-wrapped LLM-Seg module) and sends it to one destination:

* ``vlm``: the base VLM written as a transformers ``LlavaForConditionalGeneration``
  (``WEIGHTS_DIR/vlm``); the target is its native parameter name;
* ``adapter``: the LoRA adapter in peft's format (``WEIGHTS_DIR/adapter``);
* ``heads``: ``heads.safetensors`` (``projection.*``, ``mask_proj.*``, ``selector.*``,
  ``mask_decoder.*``);
* ``derived``: a buffer recomputed from the config (rotary ``inv_freq``, CLIP
  ``position_ids``): checked to hold the recomputed value, then dropped;
* ``frozen``: a frozen copy of public weights (SAM ViT-H, DINOv2 ViT-L/14): checked
  against the public file when one is given, then dropped.

A key no rule matches is an error that names it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("vlm", "adapter", "heads", "derived", "frozen")

# The authors' source files (LLM-Seg: wangjunchi/LLMSeg, LISA: dvlab-research/LISA).
SRC_LLAVA = (
    "model/llava/model/language_model/llava_llama.py (LlavaLlamaForCausalLM = transformers LlamaForCausalLM)"
)
SRC_CLIP = (
    "model/llava/model/multimodal_encoder/clip_encoder.py (CLIPVisionTower: transformers CLIPVisionModel)"
)
SRC_PROJECTOR = "model/llava/model/llava_arch.py (mm_projector: nn.Linear(mm_hidden_size, hidden_size))"
SRC_LORA = "train_ds.py / training.py (peft 0.4 get_peft_model; LoRA on q_proj, v_proj of the language model)"
SRC_LISA = "model/LISA.py (LisaMetaModel.initialize_lisa_modules)"
SRC_SAM = "model/LISA.py (visual_model = build_sam_vit_h(...), model/segment_anything)"
SRC_DINOV2 = (
    "model/LISA.py (visual_model_dinov2 = torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14'))"
)
SRC_FUSION = "model/LISA.py + model/transformer.py (LISA_TwoWayAttentionBlock, Attention, MLPBlock)"


@dataclass(frozen=True)
class KeyRule:
    """One family of source keys.

    Attributes:
        pattern: regular expression matched against the whole key.
        kind: one of :data:`KINDS`.
        target: destination name, ``str.format``-ed with the match's groups.
        group: what the keys are (for reports and the documentation).
        origin: the authors' file that defines them.
    """

    pattern: str
    kind: str
    target: str
    group: str
    origin: str

    def match(self, key: str) -> str | None:
        """The destination of ``key``, or ``None`` when the rule does not apply."""
        found = re.fullmatch(self.pattern, key)
        return None if found is None else self.target.format(*found.groups())


_ATTN = r"(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)"
_NORM = r"(weight|bias)"

LANGUAGE_RULES: tuple[KeyRule, ...] = (
    KeyRule(
        r"model\.embed_tokens\.weight",
        "vlm",
        "model.language_model.embed_tokens.weight",
        "LLaMA token embeddings (grown by [SEG], <im_start>, <im_end>; trained)",
        SRC_LLAVA,
    ),
    KeyRule(
        r"model\.layers\.(\d+)\.self_attn\.((?:q|k|v|o)_proj\.weight)",
        "vlm",
        "model.language_model.layers.{0}.self_attn.{1}",
        "LLaMA attention projections",
        SRC_LLAVA,
    ),
    KeyRule(
        r"model\.layers\.(\d+)\.self_attn\.((?:q|v)_proj)\.lora_(A|B)\.default\.weight",
        "adapter",
        "base_model.model.model.language_model.layers.{0}.self_attn.{1}.lora_{2}.weight",
        "LoRA (r 8, alpha 16) on q_proj / v_proj",
        SRC_LORA,
    ),
    KeyRule(
        r"model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq",
        "derived",
        "rotary inv_freq {0}",
        "rotary-embedding frequencies (a buffer of transformers < 4.31)",
        SRC_LLAVA,
    ),
    KeyRule(
        r"model\.layers\.(\d+)\.(mlp\.(?:gate|up|down)_proj\.weight)",
        "vlm",
        "model.language_model.layers.{0}.{1}",
        "LLaMA MLP",
        SRC_LLAVA,
    ),
    KeyRule(
        r"model\.layers\.(\d+)\.((?:input|post_attention)_layernorm\.weight)",
        "vlm",
        "model.language_model.layers.{0}.{1}",
        "LLaMA RMS norms",
        SRC_LLAVA,
    ),
    KeyRule(r"model\.norm\.weight", "vlm", "model.language_model.norm.weight", "LLaMA final norm", SRC_LLAVA),
    KeyRule(
        r"lm_head\.weight", "vlm", "lm_head.weight", "LM head (grown with the embeddings; trained)", SRC_LLAVA
    ),
    KeyRule(
        r"model\.mm_projector\.(weight|bias)",
        "vlm",
        "model.multi_modal_projector.linear_1.{0}",
        "image projector (one Linear; linear_2 is the identity)",
        SRC_PROJECTOR,
    ),
    KeyRule(
        r"model\.vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids",
        "derived",
        "CLIP position_ids",
        "CLIP position ids (a buffer of transformers < 4.31)",
        SRC_CLIP,
    ),
    KeyRule(
        r"model\.vision_tower\.vision_tower\.vision_model\.(.+)",
        "vlm",
        "model.vision_tower.{0}",
        "CLIP ViT-L/14 vision tower (frozen; the penultimate layer's patch tokens are used)",
        SRC_CLIP,
    ),
    KeyRule(
        r"model\.text_hidden_fcs\.0\.(0|2)\.(weight|bias)",
        "heads",
        "projection.{0}.{1}",
        "text_hidden_fcs: Linear(h, h), ReLU, Linear(h, 256)",
        SRC_LISA,
    ),
)

LLMSEG_RULES: tuple[KeyRule, ...] = (
    *LANGUAGE_RULES,
    KeyRule(r"model\.visual_model\.(.+)", "frozen", "sam:{0}", "SAM ViT-H (frozen, public weights)", SRC_SAM),
    KeyRule(
        r"model\.visual_model_dinov2\.(.+)",
        "frozen",
        "dinov2:{0}",
        "DINOv2 ViT-L/14, torch.hub layout (frozen, public weights)",
        SRC_DINOV2,
    ),
    KeyRule(
        r"model\.lisa_dino_conv\.(weight|bias)",
        "heads",
        "mask_proj.{0}",
        "lisa_dino_conv: Conv2d(1024, 256, 1) on DINOv2 patch tokens",
        SRC_LISA,
    ),
    KeyRule(
        rf"model\.lisa_attention_layers\.(\d+)\.self_attn\.{_ATTN}",
        "heads",
        "selector.layers.{0}.self_attn.{1}.{2}",
        "fusion block: mask self-attention",
        SRC_FUSION,
    ),
    KeyRule(
        rf"model\.lisa_attention_layers\.(\d+)\.cross_attn_token_to_image\.{_ATTN}",
        "heads",
        "selector.layers.{0}.cross_attn_mask_to_query.{1}.{2}",
        "fusion block: masks attend to the query",
        SRC_FUSION,
    ),
    KeyRule(
        rf"model\.lisa_attention_layers\.(\d+)\.cross_attn_image_to_token\.{_ATTN}",
        "heads",
        "selector.layers.{0}.cross_attn_query_to_mask.{1}.{2}",
        "fusion block: the query attends to masks",
        SRC_FUSION,
    ),
    KeyRule(
        rf"model\.lisa_attention_layers\.(\d+)\.(norm[1-4])\.{_NORM}",
        "heads",
        "selector.layers.{0}.{1}.{2}",
        "fusion block: layer norms",
        SRC_FUSION,
    ),
    KeyRule(
        rf"model\.lisa_attention_layers\.(\d+)\.mlp\.(lin1|lin2)\.{_NORM}",
        "heads",
        "selector.layers.{0}.mlp.{1}.{2}",
        "fusion block: MLP 256 → 2048 → 256 (ReLU)",
        SRC_FUSION,
    ),
    KeyRule(
        rf"model\.lisa_final_attn\.{_ATTN}",
        "heads",
        "selector.final_attn.{0}.{1}",
        "final mask → query attention",
        SRC_FUSION,
    ),
    KeyRule(
        rf"model\.lisa_norm_final_attn\.{_NORM}",
        "heads",
        "selector.norm_final.{0}",
        "final layer norm",
        SRC_FUSION,
    ),
    KeyRule(
        r"model\.lisa_embedding_head\.(0|2)\.(weight|bias)",
        "heads",
        "selector.iou_head.{0}.{1}",
        "IoU head: MLP 256 → 2048 → 256 (cosine with the query)",
        SRC_LISA,
    ),
    KeyRule(
        r"model\.lisa_iou_head\.(0|2)\.(weight|bias)",
        "heads",
        "selector.iop_head.{0}.{1}",
        "IoP head: MLP 256 → 128 → 1, sigmoid",
        SRC_LISA,
    ),
)

LISA_RULES: tuple[KeyRule, ...] = (
    *LANGUAGE_RULES,
    KeyRule(
        r"model\.visual_model\.mask_decoder\.(.+)",
        "heads",
        "mask_decoder.{0}",
        "SAM mask decoder (fine-tuned)",
        SRC_SAM,
    ),
    KeyRule(
        r"model\.visual_model\.((?:image_encoder|prompt_encoder)\..+)",
        "frozen",
        "sam:{0}",
        "SAM ViT-H image and prompt encoders (frozen, public weights)",
        SRC_SAM,
    ),
)

# The LLM-Seg module is saved wrapped by peft: every key starts with this.
PEFT_PREFIX = "base_model.model."


def classify(key: str, rules: tuple[KeyRule, ...]) -> tuple[KeyRule, str] | None:
    """The first rule matching ``key`` and the key's destination, or ``None``."""
    for rule in rules:
        target = rule.match(key)
        if target is not None:
            return rule, target
    return None


# DINOv2: torch.hub (facebookresearch/dinov2 vision_transformer.py) → transformers Dinov2Model.
DINOV2_HUB_TO_HF: tuple[tuple[str, str], ...] = (
    (r"cls_token", "embeddings.cls_token"),
    (r"mask_token", "embeddings.mask_token"),
    (r"pos_embed", "embeddings.position_embeddings"),
    (r"patch_embed\.proj\.(weight|bias)", "embeddings.patch_embeddings.projection.{0}"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", "encoder.layer.{0}.norm1.{1}"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", "encoder.layer.{0}.attention.output.dense.{1}"),
    (r"blocks\.(\d+)\.ls1\.gamma", "encoder.layer.{0}.layer_scale1.lambda1"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", "encoder.layer.{0}.norm2.{1}"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", "encoder.layer.{0}.mlp.{1}.{2}"),
    (r"blocks\.(\d+)\.ls2\.gamma", "encoder.layer.{0}.layer_scale2.lambda1"),
    (r"norm\.(weight|bias)", "layernorm.{0}"),
)
# The hub's fused attention input projection ``blocks.N.attn.qkv`` is transformers'
# query, key and value stacked in that order.
DINOV2_QKV = r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)"
DINOV2_QKV_PARTS = ("query", "key", "value")


def dinov2_hf_names(hub_key: str) -> list[str] | None:
    """The transformers ``Dinov2Model`` parameter(s) a torch.hub DINOv2 key holds (three for ``qkv``)."""
    found = re.fullmatch(DINOV2_QKV, hub_key)
    if found:
        block, kind = found.groups()
        return [f"encoder.layer.{block}.attention.attention.{part}.{kind}" for part in DINOV2_QKV_PARTS]
    for pattern, target in DINOV2_HUB_TO_HF:
        found = re.fullmatch(pattern, hub_key)
        if found:
            return [target.format(*found.groups())]
    return None
