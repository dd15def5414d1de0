"""Generation with a KV cache for both LM kinds: greedy equals full recomputation, sampling is
seeded and restricted by top_k / top_p, and bad requests fail before any token."""

from typing import Any

import pytest
import torch

from kiln.config.spec import ModelSpec
from kiln.models import build_model
from kiln.models.generation import Sampling, generate_tokens, next_token_probs

SCHEMA = {"task": "language_modeling", "vocab_size": 257, "eos_id": 256, "block_size": 64}
PROMPT = [104, 101, 108, 108, 111, 32]  # "hello "
# Wide initialisation: random models with well separated logits, so argmax is not a coin toss
# decided by float rounding.
MODELS: dict[str, dict[str, Any]] = {
    "causal_lm-rotary": {"kind": "causal_lm", "n_layers": 2, "n_heads": 2, "d_model": 32},
    "causal_lm-learned": {
        "kind": "causal_lm",
        "n_layers": 2,
        "n_heads": 2,
        "d_model": 32,
        "positions": "learned",
    },
    "hf-gpt2": {
        "kind": "hf_causal_lm",
        "config": {
            "model_type": "gpt2",
            "n_layer": 2,
            "n_head": 2,
            "n_embd": 32,
            "n_positions": 64,
            "initializer_range": 0.3,
        },
    },
    "hf-llama": {
        "kind": "hf_causal_lm",
        "config": {
            "model_type": "llama",
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
            "initializer_range": 0.3,
        },
    },
}


def make(name: str) -> torch.nn.Module:
    options = dict(MODELS[name])
    if options["kind"] == "hf_causal_lm":
        pytest.importorskip("transformers")
    else:
        options["init_std"] = 0.3
    torch.manual_seed(0)
    return build_model(ModelSpec(**options), SCHEMA).eval()


def greedy_by_recomputation(module: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(module(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def generate(module: torch.nn.Module, n: int = 24, **sampling: Any) -> list[int]:
    return list(
        generate_tokens(
            module, PROMPT, max_new_tokens=n, sampling=Sampling(**sampling), eos_id=None
        )
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_kv_cache_greedy_equals_full_recomputation(name: str) -> None:
    module = make(name)
    tokens = generate(module, n=58)  # up to the full context of 64
    assert tokens == greedy_by_recomputation(module, PROMPT, 58)
    assert len(set(tokens)) > 3  # not a degenerate single-token loop


@pytest.mark.parametrize("name", ["causal_lm-rotary", "hf-gpt2"])
def test_sampling(name: str) -> None:
    module = make(name)
    first = generate(module, temperature=1.0, seed=7)
    assert first == generate(module, temperature=1.0, seed=7)
    assert first != generate(module, temperature=1.0, seed=8)
    greedy = generate(module)
    assert first != greedy
    assert generate(module, temperature=1.0, top_k=1) == greedy
    assert generate(module, temperature=0.7, top_p=1e-6, seed=3) == greedy


def test_eos_ends_generation_and_is_not_yielded() -> None:
    module = make("causal_lm-rotary")
    tokens = generate(module)
    eos = tokens[5]
    stopped = list(
        generate_tokens(module, PROMPT, max_new_tokens=24, sampling=Sampling(), eos_id=eos)
    )
    assert stopped == tokens[: tokens.index(eos)]
    assert generate(module, n=7) == tokens[:7]
    assert generate(module, n=0) == []


def test_generation_leaves_training_mode_and_autograd_as_they_were() -> None:
    module = make("causal_lm-learned").train()
    tokens = generate_tokens(module, PROMPT, max_new_tokens=3, sampling=Sampling(), eos_id=None)
    next(tokens)
    assert torch.is_grad_enabled()  # between tokens, the caller's autograd state holds
    list(tokens)
    assert module.training


def test_top_k_top_p_temperature() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    nucleus = next_token_probs(logits, Sampling(temperature=1.0, top_p=0.7))
    torch.testing.assert_close(nucleus, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    only_best = next_token_probs(logits, Sampling(temperature=1.0, top_p=0.5))
    torch.testing.assert_close(only_best, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    top2 = next_token_probs(logits, Sampling(temperature=1.0, top_k=2))
    torch.testing.assert_close(top2, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    plain = next_token_probs(logits, Sampling(temperature=1.0))
    torch.testing.assert_close(plain, torch.tensor([0.5, 0.3, 0.15, 0.05]))
    sharp = next_token_probs(logits, Sampling(temperature=0.5))
    assert float(sharp[0]) > 0.5 and float(sharp[3]) < 0.05


def test_top_p_sampling_stays_in_the_nucleus() -> None:
    module = make("causal_lm-rotary")
    with torch.no_grad():
        logits = module(torch.tensor([PROMPT]))[0, -1]
    probs = torch.softmax(logits, -1)
    order = probs.argsort(descending=True)
    nucleus_size = int((probs[order].cumsum(0) - probs[order] < 0.5).sum())
    nucleus = set(order[:nucleus_size].tolist())
    assert 1 < nucleus_size < 257
    seen = {
        generate_tokens(
            module, PROMPT, max_new_tokens=1, sampling=Sampling(1.0, top_p=0.5, seed=s), eos_id=None
        ).__next__()
        for s in range(60)
    }
    assert seen <= nucleus and len(seen) > 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature: must be >= 0"),
        ({"top_k": 0}, "top_k: must be >= 1"),
        ({"top_p": 0.0}, r"top_p: must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p: must be in \(0, 1\]"),
    ],
)
def test_bad_sampling(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


@pytest.mark.parametrize("name", ["causal_lm-rotary", "hf-gpt2"])
def test_context_length_and_empty_prompt_errors(name: str) -> None:
    module = make(name)
    with pytest.raises(ValueError, match="exceeds the model's context length 64"):
        generate_tokens(module, PROMPT, max_new_tokens=59, sampling=Sampling(), eos_id=None)
    with pytest.raises(ValueError, match="prompt: must hold at least one token"):
        generate_tokens(module, [], max_new_tokens=1, sampling=Sampling(), eos_id=None)
    assert len(generate(module, n=58)) == 58  # exactly at the limit is fine
