"""The language-model predictor: one class behind the OpenAI-compatible routes, batch generation
and direct calls, so the same prompt gives the same text everywhere.

A prompt is encoded as the end-of-text id followed by its tokens: in training every document
after the first follows an end-of-text id, so that is how a fresh document starts. Generation
runs with a KV cache (`kiln.models.generation`); text comes out incrementally, with stop
sequences held back until they can be ruled out and cut when they match.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.data.text import ChatTemplate, TextPreprocessor, Tokenizer
from kiln.errors import DataError
from kiln.models.generation import Sampling, generate_tokens
from kiln.registry import Registry
from kiln.registry.model import RegisteredModel, load_model

LANGUAGE_MODELING = "language_modeling"


@dataclass
class GenerationRequest:
    """One completion to generate; `temperature` 0 is greedy decoding."""

    prompt: str
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """"stop" (end of text or a stop sequence) or "length" (max_tokens reached)."""


def is_language_model(registry: str, ref: str) -> bool:
    """Whether the registered model `ref` was trained with data.task language_modeling."""
    reg = Registry(registry)
    document = reg.read_document(reg.resolve(ref), "model.json")
    return bool(document.get("task") == LANGUAGE_MODELING)


class LMPredictor:
    """Generate text with a registered language model.

    Args:
        registry: registry root (path or URI).
        ref: `name`, `name:version` or `name@alias`; resolved once, at construction.
        device: torch device, e.g. "cpu" or "cuda".

    Raises:
        DataError: `ref` is not a language model.
    """

    def __init__(self, registry: str, ref: str, *, device: str = "cpu") -> None:
        self.model: RegisteredModel = load_model(Registry(registry), ref)
        pre = self.model.preprocessor
        if not isinstance(pre, TextPreprocessor):
            raise DataError(
                f"{self.model.ref} is a {pre.task} model, not a language model; "
                "score it without --task generate"
            )
        self.device = torch.device(device)
        self.module = self.model.module.to(self.device)
        self.preprocessor = pre
        self.tokenizer: Tokenizer = pre.tokenizer
        self.chat_template: ChatTemplate = pre.chat_template
        self.context_length = int(getattr(self.module, "context_length", pre.block_size))

    @property
    def ref(self) -> str:
        """name:version of the loaded model."""
        return self.model.ref

    def encode_prompt(self, prompt: str) -> list[int]:
        """The ids the model sees for `prompt`: end-of-text, then the prompt's tokens."""
        return [self.tokenizer.eos_id, *self.tokenizer.encode(prompt)]

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` alone (no end-of-text id)."""
        return len(self.tokenizer.encode(text))

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """The prompt for a chat: the model's template applied to `messages`.

        Raises:
            DataError: malformed messages, naming `messages[i].field`.
        """
        return self.chat_template.render(messages, add_generation_prompt=True)

    def complete(self, request: GenerationRequest) -> Completion:
        """Generate the whole completion."""
        final = None
        for piece in self.stream(request):
            if isinstance(piece, Completion):
                final = piece
        assert final is not None
        return final

    def stream(self, request: GenerationRequest) -> Iterator[str | Completion]:
        """Text deltas as they are generated, then one `Completion` with the full text.

        Raises:
            DataError: a parameter out of range or a prompt that leaves no room for
                `max_tokens` in the context, naming the parameter.
        """
        prompt_ids = self._check(request)
        sampling = Sampling(
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            seed=request.seed,
        )
        stops = [s for s in request.stop if s]
        decoder = self.tokenizer.decoder()
        text, sent, generated, finish = "", 0, 0, "length"
        tokens = generate_tokens(
            self.module,
            prompt_ids,
            max_new_tokens=request.max_tokens,
            sampling=sampling,
            eos_id=self.tokenizer.eos_id,
        )
        for token in tokens:
            generated += 1
            text += decoder.push(token)
            cut = _first_stop(text, stops)
            if cut is not None:
                text, finish = text[:cut], "stop"
                break
            safe = len(text) - _partial_stop(text, stops)
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        else:
            text += decoder.flush()
            cut = _first_stop(text, stops)
            if cut is not None:
                text = text[:cut]
            if cut is not None or generated < request.max_tokens:
                finish = "stop"  # a stop sequence, or the end-of-text id
        if len(text) > sent:
            yield text[sent:]
        yield Completion(text, len(prompt_ids), generated, finish)

    def _check(self, request: GenerationRequest) -> list[int]:
        if request.max_tokens < 1:
            raise DataError(f"max_tokens must be at least 1, got {request.max_tokens}")
        if request.temperature < 0:
            raise DataError(f"temperature must be >= 0, got {request.temperature}")
        if request.top_p is not None and not 0.0 < request.top_p <= 1.0:
            raise DataError(f"top_p must be in (0, 1], got {request.top_p}")
        if request.top_k is not None and request.top_k < 1:
            raise DataError(f"top_k must be at least 1, got {request.top_k}")
        prompt_ids = self.encode_prompt(request.prompt)
        if len(prompt_ids) + request.max_tokens > self.context_length:
            raise DataError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({request.max_tokens}) exceeds "
                f"the model's context length of {self.context_length} tokens; shorten the prompt "
                "or lower max_tokens"
            )
        return prompt_ids


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop sequence in `text` begins, or None."""
    found = [index for index in (text.find(s) for s in stops) if index >= 0]
    return min(found) if found else None


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could still become a stop sequence."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest
