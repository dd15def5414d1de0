"""`tabular_mlp`: an MLP over scaled numeric and one-hot inputs, with embeddings for indexed
categorical columns. Classification outputs logits; regression outputs one value per row."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn
from torch.utils.checkpoint import checkpoint

from kiln.config.spec import ModelSpec

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}


class TabularMLPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    hidden_sizes: list[int] = Field(default=[128, 64], min_length=1)
    """Width of each hidden layer."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout after each hidden activation."""
    activation: str = "relu"
    """One of relu, gelu, silu, tanh, leaky_relu."""
    embedding_dim: int = Field(default=8, ge=1)
    """Embedding width per indexed categorical column."""


class TabularMLP(nn.Module):
    def __init__(
        self,
        num_inputs: int,
        cardinalities: list[int],
        num_outputs: int,
        options: TabularMLPOptions,
    ) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(
            nn.Embedding(card, options.embedding_dim) for card in cardinalities
        )
        width = num_inputs + options.embedding_dim * len(cardinalities)
        blocks = []
        for hidden in options.hidden_sizes:
            blocks.append(
                nn.Sequential(
                    nn.Linear(width, hidden),
                    ACTIVATIONS[options.activation](),
                    nn.Dropout(options.dropout),
                )
            )
            width = hidden
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(width, num_outputs)
        # Switched on by train.deepspeed.activation_checkpointing (see factory.build_model).
        self.checkpointing = False

    def forward(self, x: torch.Tensor, x_cat: torch.Tensor | None = None) -> torch.Tensor:
        if len(self.embeddings):
            if x_cat is None:
                raise ValueError("this model embeds categorical columns: pass x_cat")
            embedded = [emb(x_cat[:, i]).to(x.dtype) for i, emb in enumerate(self.embeddings)]
            x = torch.cat([x, *embedded], dim=1)
        for block in self.blocks:
            if self.checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        out: torch.Tensor = self.head(x)
        return out.squeeze(-1) if out.shape[-1] == 1 and self.head.out_features == 1 else out


def build_tabular_mlp(spec: ModelSpec, input_schema: dict[str, Any]) -> nn.Module:
    """Build a TabularMLP from `model.*` options and the fitted input schema."""
    try:
        options = TabularMLPOptions.model_validate(spec.options)
    except ValidationError as exc:
        details = "; ".join(
            f"model.{'.'.join(map(str, e['loc']))}: "
            + ("unknown option" if e["type"] == "extra_forbidden" else e["msg"])
            for e in exc.errors()
        )
        raise ValueError(details) from None
    if options.activation not in ACTIVATIONS:
        raise ValueError(f"model.activation: choose one of {sorted(ACTIVATIONS)}")
    is_classifier = input_schema["task"] == "classification"
    num_outputs = int(input_schema["num_classes"]) if is_classifier else 1
    return TabularMLP(
        int(input_schema["num_inputs"]),
        [int(c) for c in input_schema.get("categorical_cardinalities") or []],
        num_outputs,
        options,
    )
