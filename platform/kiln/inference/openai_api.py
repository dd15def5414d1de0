"""The OpenAI-compatible API of served language models: `/v1/completions`,
`/v1/chat/completions` and `/v1/models`.

Pure request parsing and response building (no Ray or web framework), like `oip.py`.

What is supported, so the official `openai` client works unchanged:
- `prompt`: a string, or a list of strings (one choice per prompt, in order; at most
  `MAX_PROMPTS`). A list is refused when streaming unless it holds one prompt. Token-id prompts
  are refused.
- `n`, `best_of`: only 1. `echo`, `logprobs`, `suffix`, `logit_bias`, penalties, tools and
  response formats: only their neutral values (anything else is a 400 naming the field, rather
  than an answer that silently ignores it). Other unknown fields are ignored, as new client
  versions send fields this server does not know.
- Sampling: `max_tokens` (chat: `max_completion_tokens` wins over `max_tokens`; without either,
  a chat reply may fill the rest of the context), `temperature` (0 = greedy), `top_p`, `stop`
  (a string or up to 4), `seed`, `stream`, `stream_options.include_usage`. `user` is accepted
  and ignored.
- The `model` field names a served model; `name:version` pins one version of a canary split.
  Responses report the exact version that answered as `name:version` in `model`.
- Errors are `{"error": {"message", "type", "param", "code"}}` with the HTTP status.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kiln.inference.oip import RequestError

MAX_PROMPTS = 16
"""Most prompts in one (non-streaming) completions request."""
MAX_STOP = 4
"""Most stop sequences in one request (OpenAI's limit)."""
CHAT_ROLES = ("system", "user", "assistant")
SSE_DONE = b"data: [DONE]\n\n"

_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", "overloaded"),
    504: ("server_error", "timeout"),
}
# Fields with their neutral values: anything else asks for a feature this server lacks.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1, None),
    "best_of": (1, None),
    "echo": (False, None),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


class APIError(RequestError):
    """A refused OpenAI-API request: HTTP status, message, the request field at fault (`param`)
    and a machine-readable `code`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, message, headers)
        self.param = param
        self.code = code


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object for an HTTP status."""
    kind, default_code = _ERROR_TYPES.get(
        status, ("invalid_request_error" if status < 500 else "server_error", None)
    )
    return {
        "error": {"message": message, "type": kind, "param": param, "code": code or default_code}
    }


def error_of(exc: RequestError) -> dict[str, Any]:
    """The error object for any RequestError (an APIError keeps its param and code)."""
    if isinstance(exc, APIError):
        return error_body(exc.status, str(exc), exc.param, exc.code)
    return error_body(exc.status, str(exc))


# ---- requests --------------------------------------------------------------------------------


class _Request(BaseModel):
    # Unknown fields are ignored: the official client and newer versions of it send fields this
    # server does not know; the ones that would change the answer are refused in `_neutral`.
    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    model: str = Field(min_length=1)
    """A served model name, or `name:version` for one version of a canary split."""
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    """Sampling temperature; 0 is greedy (deterministic)."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling: sample from the smallest set of tokens with this total probability."""
    stop: str | list[str] | None = None
    """Up to 4 strings that end the completion (not included in the text)."""
    seed: int | None = None
    """The same seed, prompt and parameters give the same sampled text."""
    stream: bool = False
    """Answer with server-sent events, one chunk per piece of text, then `data: [DONE]`."""
    stream_options: StreamOptions | None = None
    """`include_usage`: a last chunk with the token counts (and no choices)."""
    user: str | None = None
    """End-user id (accepted, not used)."""

    @model_validator(mode="before")
    @classmethod
    def _neutral(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, neutral in _NEUTRAL.items():
                if name in data and not any(_same(data[name], v) for v in neutral):
                    raise ValueError(
                        f"{name}={data[name]!r} is not supported by this server (only "
                        f"{' or '.join(json.dumps(v) for v in neutral)})|{name}"
                    )
        return data

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self) -> dict[str, Any]:
        """Generation parameters for the LM server (`max_tokens` is added by the subclass)."""
        return {
            "temperature": self.temperature,
            "top_p": None if self.top_p >= 1.0 else self.top_p,
            "stop": list(self.stop or []),
            "seed": self.seed,
        }


def _same(value: Any, neutral: Any) -> bool:
    # 0 == False in Python: compare types too, so `echo: 0` is not taken for `echo: false`.
    return bool(value == neutral and type(value) is type(neutral)) or (
        isinstance(value, int | float)
        and isinstance(neutral, int | float)
        and not isinstance(value, bool)
        and not isinstance(neutral, bool)
        and value == neutral
    )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    include_usage: bool = False
    """End the stream with a chunk that carries `usage` and no choices."""


class CompletionRequest(_Request):
    """`POST /v1/completions`."""

    prompt: str | list[str]
    """The text to continue: a string, or a list of strings (one choice each)."""
    max_tokens: int = Field(default=16, ge=1)
    """Most tokens to generate; prompt plus max_tokens must fit the model's context."""

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if not isinstance(value, str | list):
            raise ValueError(f"must be a string or a list of strings, got {type(value).__name__}")
        if isinstance(value, list):
            if not value:
                raise ValueError("the prompt list is empty")
            if not all(isinstance(p, str) for p in value):
                raise ValueError("token-id prompts are not supported; send text")
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(value)}")
        return value

    @model_validator(mode="after")
    def _stream_one(self) -> CompletionRequest:
        if self.stream and len(self.prompts) > 1:
            raise ValueError("a streamed request takes one prompt|prompt")
        return self

    @property
    def prompts(self) -> list[str]:
        """The prompts, in choice order."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def generation(self, prompt: str) -> dict[str, Any]:
        """The LM server's request for one prompt."""
        return {"prompt": prompt, "max_tokens": self.max_tokens, **self.sampling()}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    """Only text parts are supported."""
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    role: str
    """system, developer (taken as system), user or assistant."""
    content: str | list[ContentPart]
    """The text, or a list of text parts (joined)."""
    name: str | None = None
    """Accepted, not used."""

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        role = "system" if value == "developer" else value
        if role not in CHAT_ROLES:
            raise ValueError(
                f"role {value!r} is not supported (system, developer, user, assistant)"
            )
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"only text parts are supported, got {kind or part!r}")
        elif not isinstance(value, str):
            raise ValueError(f"must be a string or a list of text parts, got {value!r}")
        return value

    def text(self) -> str:
        """The content as one string."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Request):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    """The conversation so far; the model writes the next assistant message."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Most tokens to generate (deprecated by OpenAI in favour of max_completion_tokens)."""
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """Most tokens to generate; default: the rest of the model's context."""

    def generation(self) -> dict[str, Any]:
        """The LM server's request: the messages (the model's chat template renders them)."""
        return {
            "messages": [{"role": m.role, "content": m.text()} for m in self.messages],
            "max_tokens": self.max_completion_tokens or self.max_tokens,
            **self.sampling(),
        }


def parse_completion_request(document: Any) -> CompletionRequest:
    """Validate a `/v1/completions` body (parsed JSON).

    Raises:
        APIError: 400 naming the field at fault.
    """
    return _validate(CompletionRequest, document)


def parse_chat_request(document: Any) -> ChatRequest:
    """Validate a `/v1/chat/completions` body (parsed JSON).

    Raises:
        APIError: 400 naming the field at fault (e.g. `messages[1].role`).
    """
    return _validate(ChatRequest, document)


def _validate(model: type[Any], document: Any) -> Any:
    if not isinstance(document, dict):
        raise APIError(400, "the request body must be a JSON object", param=None)
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise _api_error(exc) from None


def _api_error(exc: ValidationError) -> APIError:
    error = exc.errors()[0]
    message = str(error["msg"]).removeprefix("Value error, ")
    param = _param(error["loc"])
    if "|" in message:  # a validator names its field after the bar
        message, _, param = message.rpartition("|")
    if error["type"] == "missing":
        message = "is required"
    # Union members repeat the location with the member type: keep the first, the user's field.
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more problems)" if more and error["type"] != "missing" else ""
    where = f"{param}: " if param else ""
    return APIError(400, f"{where}{message}{suffix}", param=param)


def _param(loc: Sequence[Any]) -> str | None:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("str", "list[str]", "list[ContentPart]") or "[" in str(item):
            break  # a union member's name, not a field
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or None


def split_model(field: str) -> tuple[str, str | None]:
    """`name` or `name:version` from a request's `model` field."""
    name, sep, version = field.rpartition(":")
    if sep and name and version.isdigit():
        return name, version
    return field, None


# ---- responses -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generated:
    """One finished generation, as the LM server reports it."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """"stop" (end of text or a stop sequence) or "length" (max_tokens reached)."""

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> Generated:
        return cls(
            text=str(document["text"]),
            prompt_tokens=int(document["prompt_tokens"]),
            completion_tokens=int(document["completion_tokens"]),
            finish_reason=str(document["finish_reason"]),
        )


def new_id(kind: Literal["cmpl", "chatcmpl"]) -> str:
    """A response id: `cmpl-...` or `chatcmpl-...`."""
    return f"{kind}-{uuid.uuid4().hex}"


def now() -> int:
    """`created`: Unix seconds."""
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The `usage` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(
    id: str, created: int, model: str, results: Sequence[Generated]
) -> dict[str, Any]:
    """A `text_completion`: one choice per prompt; usage summed over them."""
    choices = [
        {"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
        for i, r in enumerate(results)
    ]
    total = usage(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results))
    return {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": total,
    }


def chat_response(id: str, created: int, model: str, result: Generated) -> dict[str, Any]:
    """A `chat.completion` with the assistant's message."""
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": usage(result.prompt_tokens, result.completion_tokens),
    }


def completion_chunk(
    id: str, created: int, model: str, text: str, finish_reason: str | None = None
) -> dict[str, Any]:
    """One streamed piece of a completion."""
    return {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


def chat_chunk(
    id: str, created: int, model: str, delta: dict[str, Any], finish_reason: str | None = None
) -> dict[str, Any]:
    """One streamed piece of a chat reply (the first carries the role, the last only the finish
    reason)."""
    return {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(
    id: str, created: int, model: str, object: str, result: Generated
) -> dict[str, Any]:
    """The last chunk of a stream with `include_usage`: no choices, the token counts."""
    return {
        "id": id,
        "object": object,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(result.prompt_tokens, result.completion_tokens),
    }


def sse(document: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON document."""
    return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"


def model_object(name: str, created: int, **extra: Any) -> dict[str, Any]:
    """A `model` entry of `/v1/models` (kiln adds `task`, `versions` and the like)."""
    return {"id": name, "object": "model", "created": created, "owned_by": "kiln", **extra}


def model_list(models: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The `/v1/models` answer."""
    return {"object": "list", "data": list(models)}


# ---- OpenAPI documentation of the answers ------------------------------------------------------


class UsageDoc(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoiceDoc(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None
    """`stop`: end of text or a stop sequence; `length`: max_tokens reached."""


class CompletionDoc(BaseModel):
    """A `text_completion` (a streamed answer sends chunks of this shape as server-sent
    events, then `data: [DONE]`)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    """`served-name:version` of the version that answered."""
    choices: list[CompletionChoiceDoc]
    usage: UsageDoc | None = None


class ChatMessageDoc(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoiceDoc(BaseModel):
    index: int
    message: ChatMessageDoc
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionDoc(BaseModel):
    """A `chat.completion` (streamed: `chat.completion.chunk` events with a `delta`)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    """`served-name:version` of the version that answered."""
    choices: list[ChatChoiceDoc]
    usage: UsageDoc


class ModelDoc(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    task: str
    versions: list[dict[str, Any]]
    """`version`, `ref` and `traffic` share of each served version."""


class ModelListDoc(BaseModel):
    object: Literal["list"]
    data: list[ModelDoc]


class ErrorDetailDoc(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorDoc(BaseModel):
    """OpenAI's error body."""

    error: ErrorDetailDoc


_Request.model_rebuild()
CompletionRequest.model_rebuild()
ChatRequest.model_rebuild()

__all__ = [
    "APIError",
    "ChatRequest",
    "CompletionRequest",
    "Generated",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "error_body",
    "model_list",
    "parse_chat_request",
    "parse_completion_request",
    "sse",
    "usage",
]
