"""The OpenAI-compatible protocol layer: request validation (what is supported, what is refused
and how the error names the field), error bodies, response and server-sent-event builders."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kiln.inference import openai_api
from kiln.inference.oip import RequestError
from kiln.inference.openai_api import APIError, Generated


def completion(**fields: Any) -> openai_api.CompletionRequest:
    return openai_api.parse_completion_request({"model": "tiny-gpt", "prompt": "def ", **fields})


def chat(**fields: Any) -> openai_api.ChatRequest:
    messages = fields.pop("messages", [{"role": "user", "content": "hi"}])
    return openai_api.parse_chat_request({"model": "tiny-gpt", "messages": messages, **fields})


def refused(parse: Any, **fields: Any) -> APIError:
    with pytest.raises(APIError) as info:
        parse(**fields)
    assert info.value.status == 400
    return info.value


def test_completion_defaults_and_sampling_fields() -> None:
    request = completion()
    assert request.prompts == ["def "] and not request.stream and not request.include_usage
    assert request.generation("def ") == {
        "prompt": "def ",
        "max_tokens": 16,  # OpenAI's default for completions
        "temperature": 1.0,
        "top_p": None,
        "stop": [],
        "seed": None,
    }
    request = completion(
        prompt=["a", "b"],
        max_tokens=5,
        temperature=0,
        top_p=0.9,
        stop="\n",
        seed=3,
        user="u-1",
        stream_options={"include_usage": True},
    )
    assert request.prompts == ["a", "b"] and request.include_usage
    assert request.generation("b") == {
        "prompt": "b",
        "max_tokens": 5,
        "temperature": 0.0,
        "top_p": 0.9,
        "stop": ["\n"],
        "seed": 3,
    }


def test_neutral_values_and_unknown_fields_from_the_client_are_accepted() -> None:
    # What the official client may send alongside: neutral values, and fields this server does
    # not know (a newer client) are ignored rather than refused.
    request = completion(
        n=1,
        best_of=1,
        echo=False,
        logprobs=None,
        presence_penalty=0,
        frequency_penalty=0.0,
        logit_bias={},
        suffix=None,
        service_tier="auto",
        metadata={"a": "b"},
    )
    assert request.prompts == ["def "]
    assert chat(tools=[], response_format={"type": "text"}, store=False).messages[0].role == "user"


@pytest.mark.parametrize(
    ("fields", "param", "text"),
    [
        ({"n": 2}, "n", "n=2 is not supported"),
        ({"best_of": 3}, "best_of", "best_of=3"),
        ({"echo": True}, "echo", "echo=True"),
        ({"echo": 0}, "echo", "echo=0"),  # 0 is not false in JSON
        ({"logprobs": 2}, "logprobs", "logprobs=2"),
        ({"presence_penalty": 0.5}, "presence_penalty", "presence_penalty=0.5"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"max_tokens": "many"}, "max_tokens", "valid integer"),
        ({"temperature": -0.1}, "temperature", "greater than or equal to 0"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 stop sequences"),
        ({"stop": [""]}, "stop", "must not be empty"),
        ({"prompt": [1, 2, 3]}, "prompt", "token-id prompts are not supported"),
        ({"prompt": []}, "prompt", "the prompt list is empty"),
        ({"prompt": None}, "prompt", "a string or a list of strings"),
        ({"prompt": ["x"] * 17}, "prompt", "at most 16 prompts"),
        ({"prompt": ["a", "b"], "stream": True}, "prompt", "a streamed request takes one prompt"),
        ({"model": ""}, "model", "at least 1 character"),
    ],
)
def test_completion_refusals_name_the_field(fields: dict[str, Any], param: str, text: str) -> None:
    error = refused(completion, **fields)
    assert error.param == param
    assert str(error).startswith(f"{param}: ") and text in str(error)


def test_missing_fields_and_non_objects_are_400() -> None:
    error = refused(openai_api.parse_completion_request, document={"prompt": "x"})
    assert (error.param, str(error)) == ("model", "model: is required")
    error = refused(openai_api.parse_chat_request, document=[{"role": "user"}])
    assert error.param is None and "JSON object" in str(error)


def test_chat_messages_parts_roles_and_token_limits() -> None:
    request = chat(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": "ok", "name": "bot"},
        ],
        max_tokens=7,
    )
    generation = request.generation()
    assert generation["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a b"},
        {"role": "assistant", "content": "ok"},
    ]
    assert generation["max_tokens"] == 7
    # max_completion_tokens wins; with neither, the server fills the rest of the context.
    assert chat(max_tokens=7, max_completion_tokens=3).generation()["max_tokens"] == 3
    assert chat().generation()["max_tokens"] is None


@pytest.mark.parametrize(
    ("messages", "param", "text"),
    [
        ([], "messages", "at least 1 item"),
        ("hi", "messages", "valid list"),
        ([{"role": "tool", "content": "x"}], "messages[0].role", "role 'tool' is not supported"),
        ([{"content": "x"}], "messages[0].role", "is required"),
        ([{"role": "user"}], "messages[0].content", "is required"),
        ([{"role": "user", "content": None}], "messages[0].content", "a string or a list"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "user", "content": [{"type": "image_url"}]},
            ],
            "messages[1].content",
            "only text parts are supported, got 'image_url'",
        ),
    ],
)
def test_malformed_messages_name_the_element(messages: Any, param: str, text: str) -> None:
    error = refused(chat, messages=messages)
    assert error.param == param and text in str(error)


def test_model_field_may_pin_a_version() -> None:
    assert openai_api.split_model("tiny-gpt") == ("tiny-gpt", None)
    assert openai_api.split_model("tiny-gpt:3") == ("tiny-gpt", "3")
    assert openai_api.split_model("ns:model") == ("ns:model", None)


def test_error_bodies_follow_openai() -> None:
    assert openai_api.error_body(400, "max_tokens: too big", "max_tokens") == {
        "error": {
            "message": "max_tokens: too big",
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": None,
        }
    }
    for status, kind, code in [
        (401, "invalid_request_error", "invalid_api_key"),
        (404, "invalid_request_error", "not_found"),
        (413, "invalid_request_error", "request_too_large"),
        (429, "rate_limit_error", "rate_limit_exceeded"),
        (503, "server_error", "overloaded"),
        (504, "server_error", "timeout"),
    ]:
        error = openai_api.error_body(status, "m")["error"]
        assert (error["type"], error["code"]) == (kind, code)
    pinned = APIError(404, "no such model", param="model", code="model_not_found")
    assert openai_api.error_of(pinned)["error"]["code"] == "model_not_found"
    plain = openai_api.error_of(RequestError(413, "too big"))["error"]
    assert (plain["message"], plain["param"], plain["code"]) == (
        "too big",
        None,
        "request_too_large",
    )


RESULTS = [
    Generated(text="x = 1", prompt_tokens=4, completion_tokens=5, finish_reason="stop"),
    Generated(text="y", prompt_tokens=3, completion_tokens=16, finish_reason="length"),
]


def test_completion_and_chat_responses() -> None:
    document = openai_api.completion_response("cmpl-1", 1700000000, "tiny-gpt:3", RESULTS)
    assert document["object"] == "text_completion" and document["model"] == "tiny-gpt:3"
    assert [(c["index"], c["text"], c["finish_reason"]) for c in document["choices"]] == [
        (0, "x = 1", "stop"),
        (1, "y", "length"),
    ]
    assert document["usage"] == {"prompt_tokens": 7, "completion_tokens": 21, "total_tokens": 28}
    reply = openai_api.chat_response("chatcmpl-1", 1700000000, "tiny-gpt:3", RESULTS[0])
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "x = 1"}
    assert reply["usage"]["total_tokens"] == 9
    assert openai_api.new_id("cmpl").startswith("cmpl-")
    assert openai_api.new_id("chatcmpl") != openai_api.new_id("chatcmpl")
    assert Generated.from_dict(
        {"text": "a", "prompt_tokens": 1, "completion_tokens": 2, "finish_reason": "stop"}
    ) == Generated("a", 1, 2, "stop")


def test_stream_chunks_are_server_sent_events() -> None:
    event = openai_api.sse(openai_api.completion_chunk("cmpl-1", 5, "m:1", "de"))
    assert event.startswith(b"data: {") and event.endswith(b"\n\n")
    chunk = json.loads(event[len(b"data: ") :])
    assert chunk["choices"] == [{"index": 0, "text": "de", "logprobs": None, "finish_reason": None}]
    last = openai_api.chat_chunk("chatcmpl-1", 5, "m:1", {}, "stop")
    assert last["object"] == "chat.completion.chunk"
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    usage = openai_api.usage_chunk("chatcmpl-1", 5, "m:1", "chat.completion.chunk", RESULTS[1])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 16
    assert openai_api.SSE_DONE == b"data: [DONE]\n\n"
    listing = openai_api.model_list([openai_api.model_object("m", 5, task="language_modeling")])
    assert listing == {
        "object": "list",
        "data": [
            {
                "id": "m",
                "object": "model",
                "created": 5,
                "owned_by": "kiln",
                "task": "language_modeling",
            }
        ],
    }
