"""The `causal_lm` and `hf_causal_lm` model kinds: options, shapes, positions, tied weights,
activation checkpointing, safetensors round trips, and that a tiny model actually learns."""

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kiln.config.spec import ModelSpec
from kiln.errors import SpecError
from kiln.models import build_model
from kiln.models.causal_lm import CausalLM, apply_rotary, rotary_tables
from kiln.models.generation import Sampling, generate_tokens

SCHEMA = {
    "task": "language_modeling",
    "vocab_size": 257,
    "eos_id": 256,
    "block_size": 32,
    "features": ["text"],
}
TINY = {"n_layers": 2, "n_heads": 2, "d_model": 32}
TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}


def lm(schema: dict[str, Any] = SCHEMA, **options: Any) -> CausalLM:
    module = build_model(ModelSpec(kind="causal_lm", **{**TINY, **options}), schema)
    assert isinstance(module, CausalLM)
    return module


def batch(b: int = 2, t: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 257, (b, t), generator=torch.Generator().manual_seed(seed))


def loss_of(module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = module(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_defaults_and_shapes() -> None:
    module = build_model(ModelSpec(kind="causal_lm"), SCHEMA)
    assert isinstance(module, CausalLM)
    assert module.context_length == 32  # from block_size
    assert (len(module.blocks), module.options.n_heads, module.options.d_model) == (4, 4, 128)
    assert module.blocks[0].mlp.up.out_features == 512  # d_ff = 4 * d_model
    assert module(batch()).shape == (2, 32, 257)
    assert module(batch(3, 5)).shape == (3, 5, 257)
    with pytest.raises(ValueError, match="exceeds context_length 32"):
        module(batch(1, 33))
    assert lm(context_length=64).context_length == 64


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_heads": 3}, "model.n_heads: 3 does not divide d_model 32"),
        ({"d_model": 12, "n_heads": 4}, "model.positions: rotary needs an even head size"),
        ({"positions": "alibi"}, "model.positions: Input should be 'rotary' or 'learned'"),
        ({"n_layer": 2}, "model.n_layer: unknown option"),
        ({"dropout": 1.0}, "model.dropout: Input should be less than 1"),
        ({"d_ff": 0}, "model.d_ff: Input should be greater than or equal to 1"),
        ({"context_length": 16}, "model.context_length: 16 is shorter than data.block_size 32"),
    ],
)
def test_bad_options_name_the_option(options: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=rf"^model \(causal_lm\): {message}"):
        lm(**options)


def test_needs_a_language_modelling_schema() -> None:
    schema = {"task": "classification", "num_inputs": 4, "num_classes": 2}
    with pytest.raises(SpecError, match="causal_lm needs data.task language_modeling"):
        lm(schema)


def test_causal_masking_later_tokens_do_not_change_earlier_logits() -> None:
    module = lm().eval()
    ids = batch(1)
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 257
    before, after = module(ids), module(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_rotary_scores_depend_only_on_relative_position() -> None:
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> float:
        cos, sin = rotary_tables(torch.tensor([m, n]), 16, 10_000.0)
        rq = apply_rotary(q, cos[:1], sin[:1])
        rk = apply_rotary(k, cos[1:], sin[1:])
        return float((rq * rk).sum())

    assert score(5, 3) == pytest.approx(score(12, 10), abs=1e-5)
    assert score(5, 3) != pytest.approx(score(5, 4), abs=1e-3)
    cos, sin = rotary_tables(torch.tensor([7]), 16, 10_000.0)
    assert float(apply_rotary(q, cos, sin).norm()) == pytest.approx(float(q.norm()), rel=1e-5)


def test_rotary_has_no_position_parameters_learned_has_a_table() -> None:
    rotary, learned = lm(), lm(positions="learned")
    assert rotary.pos_emb is None
    assert learned.pos_emb is not None
    assert learned.pos_emb.weight.shape == (32, 32)
    n_rotary = sum(p.numel() for p in rotary.parameters())
    n_learned = sum(p.numel() for p in learned.parameters())
    assert n_learned - n_rotary == 32 * 32
    ids = batch(1)
    before = learned.eval()(ids)
    with torch.no_grad():
        learned.pos_emb.weight.zero_()
    assert not torch.allclose(learned(ids), before)  # the table is used


@torch.no_grad()
def test_scaled_init() -> None:
    module = lm(n_layers=8, d_model=64, n_heads=4)
    assert float(module.tok_emb.weight.std()) == pytest.approx(0.02, rel=0.05)
    assert float(module.blocks[0].attn.qkv.weight.std()) == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(16)
    assert float(module.blocks[3].attn.proj.weight.std()) == pytest.approx(residual, rel=0.1)
    assert float(module.blocks[3].mlp.down.weight.std()) == pytest.approx(residual, rel=0.1)


def test_tied_embeddings_are_one_parameter_and_round_trip_through_safetensors(
    tmp_path: Path,
) -> None:
    tied, untied = lm(), lm(tied_embeddings=False)
    assert tied.lm_head is None
    assert "lm_head.weight" not in tied.state_dict()
    n_tied = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in untied.parameters()) - n_tied == 257 * 32
    # The embedding gets gradient from both uses: input lookup and output projection.
    loss_of(tied, batch()).backward()
    grad = tied.tok_emb.weight.grad
    assert grad is not None and int((grad.abs().sum(dim=1) > 0).sum()) == 257

    for module in (tied, untied):
        save_file(module.state_dict(), tmp_path / "w.safetensors")
        fresh = lm(tied_embeddings=module.lm_head is None)
        fresh.load_state_dict(load_file(tmp_path / "w.safetensors"), strict=True)
        ids = batch(1)
        torch.testing.assert_close(fresh.eval()(ids), module.eval()(ids))


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    plain = lm()
    checkpointed = build_model(
        ModelSpec(kind="causal_lm", **TINY), SCHEMA, activation_checkpointing=True
    )
    assert isinstance(checkpointed, CausalLM) and checkpointed.checkpointing
    checkpointed.load_state_dict(plain.state_dict())
    ids = batch()
    loss_plain, loss_ckpt = loss_of(plain, ids), loss_of(checkpointed, ids)
    loss_plain.backward()
    loss_ckpt.backward()
    torch.testing.assert_close(loss_plain, loss_ckpt)
    for (name, a), (_, b) in zip(
        plain.named_parameters(), checkpointed.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_dropout_only_in_training() -> None:
    module = lm(dropout=0.2)
    ids = batch(1)
    assert not torch.allclose(module.train()(ids), module(ids))
    torch.testing.assert_close(module.eval()(ids), module(ids))


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_tiny_model_learns_a_repeated_text(positions: str) -> None:
    torch.manual_seed(0)
    text = list(b"the kiln fires clay. " * 8)
    ids = torch.tensor([text[i : i + 33] for i in range(0, len(text) - 33, 3)])
    module = lm(positions=positions)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    first = float(loss_of(module, ids).detach())
    for _ in range(150):
        optimizer.zero_grad()
        loss = loss_of(module, ids)
        loss.backward()
        optimizer.step()
    assert first > 5.0  # about ln(257): the untrained model knows nothing
    assert float(loss.detach()) < 0.2
    prompt = list(b"the kiln ")
    tokens = generate_tokens(
        module, prompt, max_new_tokens=20, sampling=Sampling(), eos_id=SCHEMA["eos_id"]
    )
    assert bytes(tokens) == b"fires clay. the kiln"


# --- hf_causal_lm -----------------------------------------------------------------------------


def hf(schema: dict[str, Any] = SCHEMA, **options: Any) -> torch.nn.Module:
    pytest.importorskip("transformers")
    return build_model(ModelSpec(kind="hf_causal_lm", **options), schema)


def test_hf_from_config() -> None:
    module = hf(config=TINY_GPT2)
    assert type(module.model).__name__ == "GPT2LMHeadModel"
    assert module.context_length == 64
    assert module.model.config.vocab_size == 257  # from the tokenizer
    assert module.model.config.eos_token_id == 256
    assert module(batch(2, 10)).shape == (2, 10, 257)


def test_hf_tied_weights_save_with_safetensors_and_load_strictly(tmp_path: Path) -> None:
    module = hf(config=TINY_GPT2).eval()
    assert module.model.lm_head.weight is module.model.transformer.wte.weight
    # One entry per parameter, named as named_parameters() names it (what trainers gather).
    assert list(module.state_dict()) == [name for name, _ in module.named_parameters()]
    assert "model.lm_head.weight" not in module.state_dict()
    save_file(module.state_dict(), tmp_path / "w.safetensors")
    fresh = hf(config=TINY_GPT2).eval()
    fresh.load_state_dict(load_file(tmp_path / "w.safetensors"), strict=True)
    assert fresh.model.lm_head.weight is fresh.model.transformer.wte.weight
    ids = batch(1, 12)
    torch.testing.assert_close(fresh(ids), module(ids))
    # A state dict naming both (transformers' own) loads strictly too.
    both = {f"model.{key}": value for key, value in module.model.state_dict().items()}
    assert "model.lm_head.weight" in both
    fresh.load_state_dict(both, strict=True)
    # Rebuilt from its portable options (no pretrained directory needed), weights fit strictly.
    portable = hf(**module.portable_options()).eval()
    portable.load_state_dict(module.state_dict(), strict=True)
    torch.testing.assert_close(portable(ids), module(ids))


def test_hf_from_a_local_pretrained_directory(tmp_path: Path) -> None:
    original = hf(config=TINY_GPT2).eval()
    original.model.save_pretrained(tmp_path / "ckpt")
    loaded = hf(pretrained=str(tmp_path / "ckpt")).eval()
    assert loaded.model.dtype == torch.float32
    ids = batch(1, 12)
    torch.testing.assert_close(loaded(ids), original(ids))
    bigger = {**SCHEMA, "vocab_size": 300}
    with pytest.raises(SpecError, match="model.pretrained: vocabulary of 257 is smaller"):
        hf(bigger, pretrained=str(tmp_path / "ckpt"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "give exactly one of model.config or model.pretrained"),
        ({"config": TINY_GPT2, "pretrained": "/x"}, "give exactly one of"),
        ({"config": {"n_layer": 1}}, "model.config.model_type: required"),
        ({"config": {"model_type": "no-such-arch"}}, "model.config: Unrecognized model"),
        ({"config": {**TINY_GPT2, "vocab_size": 100}}, "model.config.vocab_size: 100 is smaller"),
        ({"pretrained": "/no/such/dir"}, "model.pretrained: /no/such/dir is not a directory"),
        ({"config": TINY_GPT2, "revision": "main"}, "model.revision: unknown option"),
    ],
)
def test_hf_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        hf(**options)


def test_hf_without_transformers_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(SpecError, match=r"pip install kiln\[hf\]"):
        build_model(ModelSpec(kind="hf_causal_lm", config=TINY_GPT2), SCHEMA)


def test_hf_gradient_checkpointing_gives_the_same_gradients() -> None:
    config = {**TINY_GPT2, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    plain = hf(config=config)
    pytest.importorskip("transformers")
    checkpointed = build_model(
        ModelSpec(kind="hf_causal_lm", config=config), SCHEMA, activation_checkpointing=True
    )
    assert checkpointed.checkpointing
    checkpointed.load_state_dict(plain.state_dict())
    plain.train()
    checkpointed.train()
    ids = batch(2, 16)
    loss_of(plain, ids).backward()
    loss_of(checkpointed, ids).backward()
    for (name, a), (_, b) in zip(
        plain.named_parameters(), checkpointed.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    checkpointed.checkpointing = False
    assert not checkpointed.checkpointing
