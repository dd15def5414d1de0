"""The LM server's protocol pieces without Ray: which request field a refused generation names,
and the server-sent events built from a replica's stream (order, usage, errors, cancelling)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from kiln.errors import DataError
from kiln.inference import openai_api
from kiln.inference.lm_server import EventStream, refusal


def test_refusals_name_the_request_field() -> None:
    prompt = {"prompt": "x"}
    chat = {"messages": [{"role": "user", "content": "x"}]}
    too_long = DataError(
        "prompt (11 tokens) + max_tokens (500) exceeds the model's context length of 64 tokens"
    )
    assert refusal(too_long, prompt) == {
        "error": str(too_long),
        "param": "max_tokens",
        "code": "context_length_exceeded",
    }
    full = DataError("prompt: 70 tokens fill the model's whole context of 64 tokens")
    assert refusal(full, prompt)["param"] == "prompt"
    assert refusal(DataError("messages: 70 tokens fill the whole context"), chat)["param"] == (
        "messages"
    )
    role = refusal(DataError("messages[1].role: must be one of system, user, assistant"), chat)
    assert (role["param"], role["code"]) == ("messages[1].role", None)
    assert refusal(DataError("top_p must be in (0, 1], got 2"), prompt)["param"] == "top_p"
    assert refusal(DataError("something else"), prompt)["param"] is None


class Pieces:
    """A replica's stream: async iteration plus cancel(), like a DeploymentResponseGenerator."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items, self.cancelled = list(items), False

    def __aiter__(self) -> Pieces:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


DONE = {"text": "ab", "prompt_tokens": 3, "completion_tokens": 2, "finish_reason": "length"}


def events(stream: EventStream, limit: int | None = None) -> list[Any]:
    async def collect() -> list[bytes]:
        out: list[bytes] = []
        generator = stream.run()
        async for event in generator:
            out.append(event)
            if limit is not None and len(out) == limit:
                await generator.aclose()
                break
        return out

    parsed = []
    for event in asyncio.run(collect()):
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        body = event[len(b"data: ") : -2]
        parsed.append(body.decode() if body == b"[DONE]" else json.loads(body))
    return parsed


def stream_of(
    items: list[dict[str, Any]], chat: bool = False, usage: bool = False
) -> tuple[EventStream, Pieces]:
    fields = {"model": "m", "stream": True, "stream_options": {"include_usage": usage}}
    if chat:
        parsed: Any = openai_api.parse_chat_request(
            {**fields, "messages": [{"role": "user", "content": "x"}]}
        )
    else:
        parsed = openai_api.parse_completion_request({**fields, "prompt": "x"})
    pieces = Pieces(items[1:])
    deadline = time.monotonic() + 5
    return EventStream("m:1", "m:1", pieces, items[0], parsed, chat, deadline), pieces


def test_completion_events_end_with_the_finish_reason_usage_and_done() -> None:
    stream, pieces = stream_of([{"delta": "a"}, {"delta": "b"}, {"done": DONE}], usage=True)
    out = events(stream)
    assert [e["choices"][0]["text"] for e in out[:3]] == ["a", "b", ""]
    assert [e["choices"][0]["finish_reason"] for e in out[:3]] == [None, None, "length"]
    assert out[3]["choices"] == [] and out[3]["usage"]["total_tokens"] == 5
    assert out[4] == "[DONE]" and len(out) == 5
    assert len({e["id"] for e in out[:4]}) == 1 and out[0]["model"] == "m:1"
    assert not pieces.cancelled


def test_chat_events_open_with_the_role_and_carry_deltas() -> None:
    stream, _ = stream_of([{"delta": "a"}, {"done": DONE}], chat=True)
    out = events(stream)
    deltas = [e["choices"][0]["delta"] for e in out[:-1]]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "a"}, {}]
    assert out[-2]["choices"][0]["finish_reason"] == "length" and out[-1] == "[DONE]"
    assert all(e["object"] == "chat.completion.chunk" for e in out[:-1])


def test_an_error_mid_stream_is_one_error_event() -> None:
    failure = {"error": "boom", "param": None, "code": None}
    stream, _ = stream_of([{"delta": "a"}, failure])
    out = events(stream)
    assert out[-1] == {
        "error": {"message": "boom", "type": "invalid_request_error", "param": None, "code": None}
    }
    assert "[DONE]" not in out


def test_a_client_that_leaves_cancels_the_generation() -> None:
    stream, pieces = stream_of([{"delta": "a"}, {"delta": "b"}, {"delta": "c"}, {"done": DONE}])
    assert len(events(stream, limit=1)) == 1
    assert pieces.cancelled
