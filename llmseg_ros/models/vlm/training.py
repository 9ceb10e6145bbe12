"""The batched teacher-forced training pass of the ``<SEG>`` VLM: LM loss and ``<SEG>`` states."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from llmseg_ros.models.vlm.conversation import ConversationFormat, check_image
from llmseg_ros.models.vlm.prefix import LlavaRunner

IGNORE_INDEX = -100


class TrainingPass:
    """One batched forward over (image, user text, answer) samples; see :meth:`__call__`."""

    def __init__(self, fmt: ConversationFormat, runner: LlavaRunner, seg_token_id: int) -> None:
        self.fmt = fmt
        self.runner = runner
        self.seg_token_id = seg_token_id

    def _sample(self, i: int, image: np.ndarray, pair: object) -> tuple[list[int], list[int], torch.Tensor]:
        """Token ids (+ eos), labels (answer tokens + eos, else ignored) and pixels of one sample."""
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise TypeError(f"conversations[{i}] must be a (user text, answer) pair of str, got {pair!r}")
        user_text, answer = pair[0].strip(), pair[1].strip()
        if not user_text or not answer:
            raise ValueError(f"conversations[{i}] has an empty user text or answer: {pair!r}")
        if self.fmt.seg_token in user_text:
            raise ValueError(f"conversations[{i}]: the user text must not contain {self.fmt.seg_token}")
        eos_id = self.fmt.tokenizer.eos_token_id
        pixel_values, _, image_text = self.fmt.image_inputs(check_image(image))
        prompt = self.fmt.render([], user_text, None)
        encoding, expanded = self.fmt.encode(f"{prompt} {answer}", image_text, offsets=True)
        answer_start = len(expanded) - len(answer) - 1  # the space before the answer
        ids = [*encoding["input_ids"], eos_id]
        label = [
            tok if start >= answer_start and end > start else IGNORE_INDEX
            for tok, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"])
        ]
        label.append(eos_id)
        if all(t == IGNORE_INDEX for t in label[:-1]):
            raise RuntimeError(f"conversations[{i}]: no answer token found after the prompt")
        return ids, label, pixel_values

    def __call__(
        self, images: list[np.ndarray], conversations: list[tuple[str, str]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss, ``<SEG>`` states and their batch indices; see :meth:`llmseg_ros.models.vlm.SegVLM.training_forward`."""
        if len(images) != len(conversations) or not images:
            raise ValueError(
                f"images and conversations must be non-empty and of equal length, got {len(images)} and "
                f"{len(conversations)}"
            )
        tokenizer = self.fmt.tokenizer
        eos_id = tokenizer.eos_token_id
        if eos_id is None:
            raise RuntimeError("the tokenizer has no eos token; cannot terminate training answers")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
        samples = [self._sample(i, image, pair) for i, (image, pair) in enumerate(zip(images, conversations))]
        length = max(len(ids) for ids, _, _ in samples)
        input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
        attention = torch.zeros((len(samples), length), dtype=torch.long)
        target = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        for b, (ids, label, _) in enumerate(samples):  # right padding
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention[b, : len(ids)] = 1
            target[b, : len(label)] = torch.tensor(label)
        device = self.runner.device
        input_ids, attention, target = (t.to(device) for t in (input_ids, attention, target))
        pixels = torch.cat([p for _, _, p in samples])
        hidden, _ = self.runner.hidden(input_ids, pixel_values=pixels, attention_mask=attention)

        # LM loss: hidden at t predicts target t + 1; only answer positions get logits.
        next_target = target[:, 1:]
        keep = next_target != IGNORE_INDEX  # (N, S-1)
        logits = self.runner.lm_head(hidden[:, :-1][keep])  # (T, vocab)
        loss = F.cross_entropy(logits.float(), next_target[keep])

        seg_mask = (input_ids == self.seg_token_id) & (target != IGNORE_INDEX)  # <SEG> in the answers
        batch_index, seg_pos = seg_mask.nonzero(as_tuple=True)
        seg_states = hidden[batch_index, seg_pos - 1].float()
        return loss, seg_states, batch_index
