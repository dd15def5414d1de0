"""Language-modeling pieces of the training loop: the token loss and the per-epoch sample."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100
"""Label of padding positions; never a target."""


def token_loss(
    engine: Any, batch: dict[str, torch.Tensor], *, reduction: str = "mean"
) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy of one packed micro-batch and its number of target tokens.

    Args:
        batch: `input_ids` and `labels` (b, block_size); labels are the inputs shifted by one,
            with IGNORE at padding.
        reduction: "mean" over target tokens (training) or "sum" (evaluation).
    """
    labels = batch["labels"].long()
    logits = engine(batch["input_ids"].long())
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE,
        reduction=reduction,
    )
    return loss, int((labels != IGNORE).sum().item())


def sample_text(module: Any, preprocessing: dict[str, Any], prompt: str, tokens: int) -> str:
    """A greedy continuation of `prompt` with the module as it is now (KV-cached)."""
    from kiln.data.text import TextPreprocessor
    from kiln.models.generation import Sampling, generate_tokens

    tokenizer = TextPreprocessor.from_dict(preprocessing).tokenizer
    # As kiln.inference.lm encodes prompts: a document starts after an end-of-text id.
    prompt_ids = [tokenizer.eos_id, *tokenizer.encode(prompt)]
    room = int(module.context_length) - len(prompt_ids)
    if room < 1:
        return ""
    ids = list(
        generate_tokens(
            module,
            prompt_ids,
            max_new_tokens=min(tokens, room),
            sampling=Sampling(),
            eos_id=tokenizer.eos_id,
        )
    )
    return tokenizer.decode(ids)
