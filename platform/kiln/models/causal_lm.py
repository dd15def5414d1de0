"""`causal_lm`: a decoder-only (GPT-style) transformer for next-token prediction.

Pre-norm blocks, torch SDPA causal attention, rotary or learned positions, optional tied
embeddings, GPT-2 style scaled initialisation. Plain `nn.Module` with every parameter created in
`__init__`, so DeepSpeed ZeRO 0-3 can shard it. The tied output head reuses the token embedding
module (`tok_emb(x, unembed=True)`), so the weight is one parameter under one name: ZeRO-3
gathers it through that module's hooks, and `state_dict()` saves with safetensors as is.

Incremental decoding: `module(ids, cache=module.new_cache())` fills the cache with the prompt's
keys and values; later calls with the same cache feed only the new tokens.
"""

from __future__ import annotations

import math
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn
from torch.utils.checkpoint import checkpoint

from kiln.config.spec import ModelSpec


class CausalLMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    n_layers: int = Field(default=4, ge=1)
    """Transformer blocks."""
    n_heads: int = Field(default=4, ge=1)
    """Attention heads per block; must divide d_model."""
    d_model: int = Field(default=128, ge=1)
    """Residual stream width."""
    d_ff: int | None = Field(default=None, ge=1)
    """Hidden width of each block's MLP; null: 4 * d_model."""
    context_length: int | None = Field(default=None, ge=1)
    """Longest sequence the model accepts; null: the data's block_size."""
    positions: Literal["rotary", "learned"] = "rotary"
    """rotary (RoPE on queries and keys) or learned absolute position embeddings."""
    rope_theta: float = Field(default=10_000.0, gt=0.0)
    """Rotary base frequency."""
    tied_embeddings: bool = True
    """The output head reuses the token embedding matrix."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on embeddings, attention probabilities and residual branches (training only)."""
    bias: bool = False
    """Biases in linear layers and layer norms."""
    init_std: float = Field(default=0.02, gt=0.0)
    """Std of the normal initialisation; residual output projections get
    init_std / sqrt(2 * n_layers)."""


class KVCache:
    """Keys and values of the tokens processed so far, per layer, for incremental decoding.

    Storage is allocated on first use, `max_length` long, in the dtype/device of the keys.
    """

    def __init__(self, n_layers: int, max_length: int) -> None:
        self.max_length = max_length
        self.length = 0
        self._keys: list[torch.Tensor | None] = [None] * n_layers
        self._values: list[torch.Tensor | None] = [None] * n_layers

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k`, `v` ([b, heads, t, head_dim]) after the cached ones; return all so far."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache full: {end} tokens > context_length {self.max_length}")
        keys, values = self._keys[layer], self._values[layer]
        if keys is None or values is None:
            shape = (*k.shape[:2], self.max_length, k.shape[3])
            keys = self._keys[layer] = k.new_empty(shape)
            values = self._values[layer] = v.new_empty(shape)
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]


def rotary_tables(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ([t, head_dim / 2], float32) for rotating queries and keys at `positions`."""
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    angles = torch.outer(positions.float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (first half, second half) of `x` [b, heads, t, head_dim]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, options: CausalLMOptions) -> None:
        super().__init__()
        self.n_heads = options.n_heads
        self.head_dim = options.d_model // options.n_heads
        self.dropout = options.dropout
        self.qkv = nn.Linear(options.d_model, 3 * options.d_model, bias=options.bias)
        self.proj = nn.Linear(options.d_model, options.d_model, bias=options.bias)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        past = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.update(layer, k, v)
        mask = None
        if past and t > 1:  # new tokens see the whole cache plus the new ones up to themselves
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=past == 0 and t > 1,
        )
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, bias: bool) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, options: CausalLMOptions, d_ff: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(options.d_model, bias=options.bias)
        self.attn = Attention(options)
        self.norm2 = nn.LayerNorm(options.d_model, bias=options.bias)
        self.mlp = MLP(options.d_model, d_ff, options.bias)
        self.drop = nn.Dropout(options.dropout)

    def residual_projections(self) -> list[nn.Linear]:
        """The layers writing into the residual stream (scaled down at init)."""
        return [self.attn.proj, self.mlp.down]

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rotary, cache, layer))
        return x + self.drop(self.mlp(self.norm2(x)))


class TokenEmbedding(nn.Module):
    """Token embedding that can also project hidden states back onto the vocabulary."""

    def __init__(self, vocab_size: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))

    def forward(self, x: torch.Tensor, unembed: bool = False) -> torch.Tensor:
        return F.linear(x, self.weight) if unembed else F.embedding(x, self.weight)


class CausalLM(nn.Module):
    """Decoder-only transformer: `forward(input_ids [b, t]) -> logits [b, t, vocab_size]`."""

    def __init__(self, vocab_size: int, context_length: int, options: CausalLMOptions) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.options = options
        d = options.d_model
        self.tok_emb = TokenEmbedding(vocab_size, d)
        self.pos_emb = nn.Embedding(context_length, d) if options.positions == "learned" else None
        self.drop = nn.Dropout(options.dropout)
        self.blocks = nn.ModuleList(
            Block(options, options.d_ff or 4 * d) for _ in range(options.n_layers)
        )
        self.norm = nn.LayerNorm(d, bias=options.bias)
        self.lm_head = None if options.tied_embeddings else nn.Linear(d, vocab_size, bias=False)
        # Switched on by train.deepspeed.activation_checkpointing (see factory.build_model).
        self.checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, std) weights, zero biases, unit norms, and residual output
        projections scaled down by sqrt(2 * n_layers) so the residual stream does not grow
        with depth."""
        std = self.options.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, TokenEmbedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
        residual_std = std / math.sqrt(2 * len(self.blocks))
        for block in self.blocks:
            for projection in cast(Block, block).residual_projections():
                nn.init.normal_(projection.weight, std=residual_std)

    def new_cache(self) -> KVCache:
        """An empty KV cache for `forward(..., cache=...)`, context_length tokens long."""
        return KVCache(len(self.blocks), self.context_length)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits for every position of `input_ids` [b, t].

        With `cache`, `input_ids` continue the tokens already in it (positions are offset by
        `cache.length`) and the cache grows by t.
        """
        t = input_ids.shape[1]
        start = cache.length if cache is not None else 0
        if start + t > self.context_length:
            raise ValueError(
                f"sequence of {start + t} tokens exceeds context_length {self.context_length}"
            )
        positions = torch.arange(start, start + t, device=input_ids.device)
        x = self.tok_emb(input_ids)
        rotary = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:
            head_dim = self.options.d_model // self.options.n_heads
            rotary = rotary_tables(positions, head_dim, self.options.rope_theta)
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            if self.checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rotary, use_reentrant=False)
            else:
                x = block(x, rotary, cache, layer)
        if cache is not None:
            cache.length += t
        x = self.norm(x)
        logits: torch.Tensor = self.tok_emb(x, True) if self.lm_head is None else self.lm_head(x)
        return logits


def parse_options(model_options: type[BaseModel], options: dict[str, Any]) -> Any:
    """Validate a kind's options; a ValueError names each bad `model.<option>`."""
    try:
        return model_options.model_validate(options)
    except ValidationError as exc:
        details = []
        for error in exc.errors():
            message = "unknown option" if error["type"] == "extra_forbidden" else error["msg"]
            message = message.removeprefix("Value error, ")
            loc = ".".join(map(str, error["loc"]))
            details.append(f"model.{loc}: {message}" if loc else message)
        raise ValueError("; ".join(details)) from None


def build_causal_lm(spec: ModelSpec, input_schema: dict[str, Any]) -> nn.Module:
    """Build a CausalLM from `model.*` options; vocab_size (and by default context_length, from
    block_size) come from the fitted text preprocessing's input schema."""
    options: CausalLMOptions = parse_options(CausalLMOptions, spec.options)
    if options.d_model % options.n_heads:
        raise ValueError(
            f"model.n_heads: {options.n_heads} does not divide d_model {options.d_model}"
        )
    if options.positions == "rotary" and (options.d_model // options.n_heads) % 2:
        raise ValueError(
            "model.positions: rotary needs an even head size (d_model / n_heads), got "
            f"{options.d_model // options.n_heads}"
        )
    if "vocab_size" not in input_schema:
        raise ValueError("model.kind: causal_lm needs data.task language_modeling (no vocab_size)")
    context_length = options.context_length or input_schema.get("block_size")
    if not context_length:
        raise ValueError("model.context_length: not set and the data gives no block_size")
    block_size = input_schema.get("block_size")
    if block_size and context_length < int(block_size):
        raise ValueError(
            f"model.context_length: {context_length} is shorter than data.block_size {block_size}"
        )
    return CausalLM(int(input_schema["vocab_size"]), int(context_length), options)
