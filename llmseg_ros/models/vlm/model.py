"""The LLaVA-style VLM that answers with a ``<SEG>`` token (LLM-Seg / LISA).

:class:`SegVLM` wraps a transformers ``LlavaForConditionalGeneration`` and its processor
and writes only the ``<SEG>`` glue, split among collaborators:

* loading (:mod:`.loading`): ``<SEG>`` is added to the tokenizer as a special token (its
  id is read back from the added token, never from a re-tokenisation that Llama
  tokenizers may split, LISA#55) and the embeddings grow when the vocabulary needs a new
  row; LoRA adapters are applied or created (peft);
* prompting (:mod:`.conversation`): the chat text and its tokenisation with the image
  placeholder expanded;
* the prefix cache (:mod:`.prefix`): the shared start of every request on a frame is run
  once and its key/value cache reused;
* the teacher-forced query (:mod:`.query`), generation (:mod:`.generation`) and the
  training pass (:mod:`.training`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmseg_ros.config import LoraSettings, PromptFormat
from llmseg_ros.models.vlm.conversation import PromptAnswer, check_image, conversation_format
from llmseg_ros.models.vlm.generation import GreedyGenerator
from llmseg_ros.models.vlm.loading import (
    DEFAULT_VLM,
    add_seg_token,
    apply_adapter,
    check_adapter_dir,
    fresh_lora,
    load_llava,
    quantization_config,
    resolve_source,
    save_adapter,
)
from llmseg_ros.models.vlm.prefix import LlavaRunner, PrefixCache, VLMPrefix
from llmseg_ros.models.vlm.query import SegQuery
from llmseg_ros.models.vlm.training import TrainingPass


def _eos_ids(base: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids of the tokenizer and the generation config."""
    eos = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        eos.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        eos.update(int(e) for e in gen_eos)
    return {int(e) for e in eos if e is not None}


class SegVLM:
    """LLaVA + ``<SEG>``: hidden-state queries, text answers and training passes.

    Build it with :meth:`load`. Attributes:
        model: the ``LlavaForConditionalGeneration`` (a peft ``PeftModel`` around it when
            an adapter is loaded or training).
        processor: the checkpoint's processor (image processor + tokenizer).
        tokenizer: ``processor.tokenizer`` (holding ``<SEG>``).
        seg_token_id: id of the added ``<SEG>`` token.
        hidden_size: width of the language model's hidden states.
        device, dtype: where the model runs and its compute dtype.
        prompt: how instructions are worded and which answer is teacher-forced (the
            weights' :class:`~llmseg_ros.config.PromptFormat`).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        seg_token_id: int,
        device: torch.device,
        dtype: torch.dtype,
        source: str,
        prompt: PromptFormat | None = None,
    ) -> None:
        self.model: Any = model
        self.processor: Any = processor
        self.tokenizer = processor.tokenizer
        self.seg_token_id = int(seg_token_id)
        self.device = device
        self.dtype = dtype
        self.source = source
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._llava: Any = base
        config = base.config
        self.hidden_size = int(config.text_config.hidden_size)
        self.image_token_id = int(config.image_token_id)
        self.image_token: str = processor.image_token
        self.prompt = prompt if prompt is not None else PromptFormat()
        self.conversation = conversation_format(processor, device=device, dtype=dtype, prompt=self.prompt)
        runner = LlavaRunner(base, device)
        self.prefix_cache = PrefixCache(self.conversation, runner, owner_id=id(self))
        self._query = SegQuery(self.prefix_cache, self.seg_token_id)
        rows = int(base.get_output_embeddings().weight.shape[0])
        suppressed = {self.image_token_id} if self.image_token_id < rows else set()
        self._generate = GreedyGenerator(
            self.prefix_cache, self.seg_token_id, _eos_ids(base, self.tokenizer), suppressed
        )
        self._training = TrainingPass(self.conversation, runner, self.seg_token_id)

    # -- loading ---------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: str | Path = DEFAULT_VLM,
        *,
        device: torch.device,
        dtype: torch.dtype,
        adapter_dir: str | Path | None = None,
        lora: LoraSettings | None = None,
        trainable: bool = False,
        quantization: str | None = None,
        prompt: PromptFormat | None = None,
    ) -> SegVLM:
        """Load a LLaVA checkpoint (local directory or hub id) and prepare ``<SEG>``.

        Args:
            model: directory written by ``save_pretrained`` or a hub id such as
                ``llava-hf/llava-1.5-7b-hf`` (resolved through the local hub cache when
                offline).
            device: where to run.
            dtype: compute dtype (float32 / float16 / bfloat16).
            adapter_dir: a directory written by :meth:`save_adapter`; applied on load.
            lora: LoRA settings for a fresh adapter when ``trainable`` and no
                ``adapter_dir`` (default :class:`LoraSettings`).
            trainable: prepare for training: a fresh LoRA (or the loaded adapter made
                trainable) with the embeddings and LM head fully trainable, train mode.
                Otherwise every weight is frozen and the model is in eval mode.
            quantization: ``None``, ``"8bit"`` or ``"4bit"`` (bitsandbytes, CUDA only);
                the vision tower, projector and LM head stay unquantised.
            prompt: the weights' prompt format (default: ours, LLaVA-1.5 with ``<SEG>``);
                its segmentation token is added to the vocabulary when absent. The
                ``llava_v1`` format (imported authors' checkpoints) also loads the PIL
                image processor the authors' transformers version used.

        Raises:
            FileNotFoundError: the model or adapter could not be found (the message says
                what was looked for and how to get it).
            ValueError: bad option (quantization on CPU, not a LLaVA checkpoint, adapter
                made for another base vocabulary).
        """
        device = torch.device(device)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        if lora is not None and not isinstance(lora, LoraSettings):
            raise TypeError(f"lora must be a LoraSettings, got {type(lora).__name__}")
        prompt = prompt if prompt is not None else PromptFormat()
        if not isinstance(prompt, PromptFormat):
            raise TypeError(f"prompt must be a PromptFormat, got {type(prompt).__name__}")
        if trainable and prompt.conversation != "llava15":
            raise ValueError(
                f"training uses the llava15 conversation format; got {prompt.conversation!r} "
                "(imported authors' checkpoints are for inference)"
            )
        quant_config = None if quantization is None else quantization_config(quantization, device, dtype)
        adapter_path = check_adapter_dir(adapter_dir)
        source = resolve_source(model)
        backend = "pil" if prompt.conversation == "llava_v1" else None
        llava, processor = load_llava(
            source, device=device, dtype=dtype, quant_config=quant_config, image_backend=backend
        )
        seg_token_id = add_seg_token(llava, processor.tokenizer, prompt.seg_token)

        net: Any = llava
        if adapter_path is not None:
            net = apply_adapter(llava, adapter_path, seg_token_id, trainable)
        elif trainable:
            net = fresh_lora(llava, lora or LoraSettings())
        else:
            for param in llava.parameters():
                param.requires_grad_(False)
        net.train(trainable)
        return cls(
            net,
            processor,
            seg_token_id=seg_token_id,
            device=device,
            dtype=dtype,
            source=source,
            prompt=prompt,
        )

    def save_adapter(self, directory: str | Path) -> None:
        """Write the peft adapter (LoRA + embeddings + LM head) and its metadata atomically.

        The directory is written under a temporary sibling name and renamed into place
        (replacing an existing one). :meth:`load` with ``adapter_dir=directory`` restores
        the exact weights.
        """
        meta = {
            "seg_token": self.prompt.seg_token,
            "seg_token_id": self.seg_token_id,
            "vocab_rows": int(self._llava.get_input_embeddings().weight.shape[0]),
            "hidden_size": self.hidden_size,
            "base_model": self.source,
        }
        save_adapter(self.model, directory, meta)

    # -- conversation text -------------------------------------------------------------
    def build_conversation(
        self,
        instruction: str,
        *,
        is_sentence: bool | None = None,
        answer: str | PromptAnswer | None = PromptAnswer.DEFAULT,
        history: list[tuple[str, str]] | None = None,
    ) -> str:
        """The full conversation text, with the (unexpanded) image placeholder.

        ``answer`` defaults to the prompt format's teacher-forced answer; ``None`` ends the
        text at the generation prompt. See
        :meth:`llmseg_ros.models.vlm.conversation.ConversationFormat.build`.
        """
        return self.conversation.build(instruction, is_sentence=is_sentence, answer=answer, history=history)

    def expanded_input_ids(self, text: str, image: np.ndarray) -> list[int]:
        """Token ids of a conversation text for ``image`` (the image placeholder expanded)."""
        _, _, image_text = self.conversation.image_inputs(check_image(image))
        return self.conversation.input_ids(text, image_text)

    # -- inference -----------------------------------------------------------------------
    @torch.inference_mode()
    def encode_prefix(self, image: np.ndarray) -> VLMPrefix:
        """Run the model once on the conversation start up to the end of the image tokens.

        Args:
            image: (H, W, 3) uint8 RGB.

        Returns:
            A :class:`VLMPrefix` reusable by :meth:`seg_hidden` and :meth:`generate` for
            any number of instructions on this image.
        """
        return self.prefix_cache.encode(image)

    @torch.inference_mode()
    def seg_hidden(
        self,
        image_or_prefix: np.ndarray | VLMPrefix,
        instruction: str,
        *,
        is_sentence: bool | None = None,
        history: list[tuple[str, str]] | None = None,
        answer: str | None = None,
    ) -> torch.Tensor:
        """The ``<SEG>`` query of one instruction: one teacher-forced pass, no generation.

        Args:
            image_or_prefix: (H, W, 3) uint8 RGB image, or its :class:`VLMPrefix` (only
                the instruction and answer tokens are run then; the prefix is not changed).
            instruction: the user's instruction (templated, see :meth:`build_conversation`).
            is_sentence: template choice; ``None`` = guessed.
            history: earlier (instruction, answer) turns, oldest first.
            answer: the teacher-forced answer; must contain the segmentation token exactly
                once; ``None`` = the prompt format's answer (``"It is <SEG>."`` for our
                weights, ``"[SEG]."`` for the authors').

        Returns:
            (hidden_size,) float32 on the model's device: the last-layer hidden state at
            the position just before ``<SEG>`` in the expanded sequence (the position whose
            next-token prediction is ``<SEG>``).
        """
        return self._query(
            image_or_prefix, instruction, is_sentence=is_sentence, history=history, answer=answer
        )

    @torch.inference_mode()
    def generate(
        self,
        image_or_prefix: np.ndarray | VLMPrefix,
        instruction: str,
        *,
        max_new_tokens: int = 64,
        history: list[tuple[str, str]] | None = None,
        is_sentence: bool | None = None,
    ) -> tuple[str, torch.Tensor | None]:
        """Greedy text answer (e.g. "It is <SEG>. Because …") and its ``<SEG>`` query.

        Args:
            image_or_prefix: (H, W, 3) uint8 RGB image or its :class:`VLMPrefix`.
            instruction: the user's instruction (templated as in :meth:`build_conversation`).
            max_new_tokens: most tokens generated (>= 1); stops earlier at end-of-sequence.
            history: earlier (instruction, answer) turns, oldest first.
            is_sentence: template choice; ``None`` = guessed.

        Returns:
            The generated text (stripped; ``<SEG>`` kept, end-of-sequence dropped) and the
            (hidden_size,) float32 hidden state that predicted the first generated
            ``<SEG>``, or ``None`` when no ``<SEG>`` was generated.
        """
        return self._generate(
            image_or_prefix,
            instruction,
            max_new_tokens=max_new_tokens,
            history=history,
            is_sentence=is_sentence,
        )

    # -- training ------------------------------------------------------------------------
    def training_forward(
        self, images: list[np.ndarray], conversations: list[tuple[str, str]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batched teacher-forced pass for training.

        Args:
            images: N (H, W, 3) uint8 RGB images (sizes may differ).
            conversations: N (user text, assistant answer) pairs. The user text is used as
                is (template it with :func:`llmseg_ros.models.prompts.training_question`); the
                answer may hold ``<SEG>`` tokens (usually one; none for plain VQA).

        Returns:
            ``loss``: scalar, mean token cross-entropy over the answer tokens and the
            end-of-sequence token after each answer (prompt and padding excluded);
            ``seg_hidden``: (M, hidden_size) float32, the hidden state predicting each
            ``<SEG>`` of the answers, in batch order; ``batch_index``: (M,) int64, the
            sample each row belongs to.
        """
        return self._training(images, conversations)
