"""Token-by-token generation with a KV cache, for both LM kinds (`causal_lm`, `hf_causal_lm`).

The module must offer `new_cache()`, `forward(input_ids, cache=...)` and `context_length`: the
prompt runs in one forward that fills the cache, then each new token is one single-token
forward. Greedy decoding this way gives exactly the tokens of recomputing the whole sequence.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits."""

    temperature: float = 0.0
    """0: greedy (argmax; top_k, top_p and seed do not apply). Otherwise logits / temperature."""
    top_k: int | None = None
    """Sample only among the k most likely tokens."""
    top_p: float | None = None
    """Nucleus sampling: only the most likely tokens whose probabilities sum to top_p."""
    seed: int | None = None
    """Same seed and prompt give the same tokens; None draws a fresh seed."""

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k: must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def next_token_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution to sample from (float32 [vocab]) given one position's `logits`."""
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep a token while the mass before it is below top_p: the most likely always stays.
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= sampling.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def _choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if sampling.greedy:
        return int(torch.argmax(logits))
    # Sample on the CPU so a seed gives the same tokens on every device.
    probs = next_token_probs(logits, sampling).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def check_generation(module: nn.Module, prompt_length: int, max_new_tokens: int) -> None:
    """ValueError when the prompt is empty or prompt + new tokens exceed the context length."""
    context_length = int(module.context_length)  # type: ignore[arg-type]
    if prompt_length < 1:
        raise ValueError("prompt: must hold at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    if prompt_length + max_new_tokens > context_length:
        raise ValueError(
            f"max_new_tokens: prompt ({prompt_length} tokens) + {max_new_tokens} new tokens "
            f"exceeds the model's context length {context_length}"
        )


def generate_tokens(
    module: nn.Module,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: Sampling,
    eos_id: int | None,
) -> Iterator[int]:
    """Yield new token ids one at a time, continuing `prompt_ids`.

    Stops after `max_new_tokens`, or at `eos_id` (not yielded). The module runs in eval mode
    (its previous mode is restored when the iterator ends) under `torch.inference_mode`.

    Raises:
        ValueError: an empty prompt, or prompt + max_new_tokens beyond `module.context_length`
            (raised by the call itself, before any token).
    """
    check_generation(module, len(prompt_ids), max_new_tokens)
    return _generate(module, list(prompt_ids), max_new_tokens, sampling, eos_id)


@torch.inference_mode()
def _generate(
    module: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: Sampling,
    eos_id: int | None,
) -> Iterator[int]:
    if max_new_tokens == 0:
        return
    device = next(module.parameters()).device
    generator = None
    if not sampling.greedy:
        generator = torch.Generator()
        if sampling.seed is None:
            generator.seed()
        else:
            generator.manual_seed(sampling.seed)
    was_training = module.training
    module.eval()
    try:
        cache = module.new_cache()  # type: ignore[operator]
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        for step in range(max_new_tokens):
            logits = module(ids, cache=cache)[0, -1]
            token = _choose(logits, sampling, generator)
            if token == eos_id:
                return
            yield token
            if step + 1 < max_new_tokens:
                ids = torch.tensor([[token]], dtype=torch.long, device=device)
    finally:
        module.train(was_training)
