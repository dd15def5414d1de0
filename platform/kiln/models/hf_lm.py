"""`hf_causal_lm`: a Hugging Face transformers causal LM, built from a config dict or loaded from
a local directory written by `save_pretrained` (never downloaded), so users can fine-tune their
own checkpoints. transformers is optional: `pip install kiln[hf]`.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import nn

from kiln.config.spec import ModelSpec
from kiln.models.causal_lm import parse_options

logger = logging.getLogger(__name__)


class HFCausalLMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    config: dict[str, Any] | None = None
    """A new, randomly initialised model: `AutoConfig.for_model(**config)` keys, `model_type`
    required (e.g. gpt2, llama); vocab_size defaults to the tokenizer's."""
    pretrained: str | None = None
    """A local directory holding a `save_pretrained` model (config.json + weights) to fine-tune;
    its vocabulary must cover the tokenizer's."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> HFCausalLMOptions:
        if (self.config is None) == (self.pretrained is None):
            raise ValueError("give exactly one of model.config or model.pretrained")
        return self


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ValueError(
            "model.kind: hf_causal_lm needs Hugging Face transformers: pip install kiln[hf]"
        ) from None
    return transformers


class HFCausalLM(nn.Module):
    """Wraps a transformers `*ForCausalLM`: `forward(input_ids [b, t]) -> logits [b, t, vocab]`.

    State-dict keys are the wrapped model's prefixed with `model.`.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        config = model.config
        length = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        if not length:
            raise ValueError(
                "model.config: the model declares no max_position_embeddings (context length)"
            )
        self.context_length = int(length)
        self.vocab_size = int(config.vocab_size)
        # transformers 5.x renamed `past_key_values` to `cache`.
        parameters = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        # A tied weight (embedding == head) is one parameter under two names. The state dict
        # keeps only the first name, as named_parameters() does (safetensors refuses shared
        # tensors), and loading fills the alias back in, so strict loads work either way.
        self.register_state_dict_post_hook(_drop_tied_aliases)
        self.register_load_state_dict_pre_hook(_restore_tied_aliases)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute activations in backward (train.deepspeed.activation_checkpointing)."""
        self.checkpointing = True

    @property
    def checkpointing(self) -> bool:
        """Activation checkpointing, as on `causal_lm` (transformers' own switch underneath)."""
        model = self.model
        if hasattr(model, "is_activation_checkpointing"):
            return bool(model.is_activation_checkpointing)
        return bool(model.is_gradient_checkpointing)

    @checkpointing.setter
    def checkpointing(self, enabled: bool) -> None:
        model = self.model
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            if enabled:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.activation_checkpointing_disable()
        elif enabled:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_disable()

    def new_cache(self) -> Any:
        """An empty transformers `DynamicCache` for `forward(..., cache=...)`."""
        dynamic_cache = _transformers().DynamicCache
        try:
            return dynamic_cache(config=self.model.config)
        except TypeError:  # transformers 4.x
            return dynamic_cache()

    def forward(self, input_ids: torch.Tensor, cache: Any = None) -> torch.Tensor:
        """Logits for `input_ids` [b, t]; with `cache` (from `new_cache`), the ids continue the
        tokens already in it and the cache grows in place."""
        kwargs = {self._cache_arg: cache} if cache is not None else {}
        output = self.model(input_ids=input_ids, use_cache=cache is not None, **kwargs)
        logits: torch.Tensor = output.logits
        return logits

    def portable_options(self) -> dict[str, Any]:
        """Options that rebuild this architecture without the pretrained directory (a
        `config` dict), for storing next to trained weights."""
        config = self.model.config.to_dict()
        return {"config": {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}}


_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "architectures", "dtype"}


def portable_options(options: dict[str, Any]) -> dict[str, Any]:
    """The `model:` options to store with trained weights: a `pretrained` directory becomes the
    `config` it holds, so the registered model rebuilds without that directory."""
    if not options.get("pretrained"):
        return options
    path = Path(str(options["pretrained"])).expanduser()
    try:
        config = _transformers().AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model.pretrained: cannot read {path}/config.json: {exc}") from None
    document = config.to_dict()
    rest = {key: value for key, value in options.items() if key != "pretrained"}
    return {
        **rest,
        "config": {k: v for k, v in document.items() if k not in _VOLATILE_CONFIG_KEYS},
    }


def _tied_aliases(module: nn.Module) -> dict[str, str]:
    """{second name: first name} for each parameter reachable under two names."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _drop_tied_aliases(
    module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    for alias in _tied_aliases(module):
        state.pop(prefix + alias, None)


def _restore_tied_aliases(
    module: nn.Module, state: dict[str, Any], prefix: str, *args: Any
) -> None:
    for alias, name in _tied_aliases(module).items():
        if prefix + alias not in state and prefix + name in state:
            state[prefix + alias] = state[prefix + name]


def _from_config(config: dict[str, Any], vocab_size: int, eos_id: int | None) -> Any:
    transformers = _transformers()
    config = dict(config)
    model_type = config.pop("model_type", None)
    if not model_type:
        raise ValueError("model.config.model_type: required (e.g. gpt2, llama)")
    config.setdefault("vocab_size", vocab_size)
    if eos_id is not None:  # not the model type's defaults, which may lie outside our vocabulary
        config.setdefault("bos_token_id", eos_id)
        config.setdefault("eos_token_id", eos_id)
    if int(config["vocab_size"]) < vocab_size:
        raise ValueError(
            f"model.config.vocab_size: {config['vocab_size']} is smaller than the tokenizer's "
            f"{vocab_size}"
        )
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"model.config: {exc}") from None
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return model


def _from_pretrained(directory: str, vocab_size: int) -> Any:
    transformers = _transformers()
    path = Path(directory).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"model.pretrained: {directory} is not a directory with a config.json")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"model.pretrained: cannot load {directory}: {exc}") from None
    if int(model.config.vocab_size) < vocab_size:
        raise ValueError(
            f"model.pretrained: vocabulary of {model.config.vocab_size} is smaller than the "
            f"tokenizer's {vocab_size}"
        )
    logger.info("loaded pretrained %s from %s", type(model).__name__, path)
    return model


def build_hf_causal_lm(spec: ModelSpec, input_schema: dict[str, Any]) -> nn.Module:
    """Build an HFCausalLM from `model.config` or `model.pretrained`; the vocabulary must
    cover the fitted tokenizer's (`input_schema["vocab_size"]`)."""
    options: HFCausalLMOptions = parse_options(HFCausalLMOptions, spec.options)
    if "vocab_size" not in input_schema:
        raise ValueError(
            "model.kind: hf_causal_lm needs data.task language_modeling (no vocab_size)"
        )
    vocab_size = int(input_schema["vocab_size"])
    if options.config is not None:
        eos_id = input_schema.get("eos_id")
        model = _from_config(options.config, vocab_size, None if eos_id is None else int(eos_id))
    else:
        model = _from_pretrained(str(options.pretrained), vocab_size)
    module = HFCausalLM(model)
    block_size = input_schema.get("block_size")
    if block_size and module.context_length < int(block_size):
        raise ValueError(
            f"model: context length {module.context_length} is shorter than data.block_size "
            f"{block_size}"
        )
    return module
