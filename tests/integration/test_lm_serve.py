"""A language model served on the session's local Ray, through the official `openai` client:
completions and chat, streamed and not, usage, /v1/models, OpenAI-style errors; and the same
greedy text from the endpoint, batch generation (`score --task generate`) and `LMPredictor`."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import torch
import yaml

from kiln.config.spec import ModelSpec
from kiln.data.text import ByteTokenizer, TextPreprocessor
from kiln.errors import DataError, KilnError
from kiln.inference.batch import GenerateOptions, score
from kiln.inference.lm import GenerationRequest, LMPredictor
from kiln.models import build_model
from kiln.registry import Registry
from kiln.registry.store import ModelVersion
from tests.unit.test_predictor import register_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

TOKEN = "kiln-lm-test-token-0123456789"
TIMEOUT = 30
CONTEXT = 128
PROMPTS = ["def f(", "import os\n", "class A:"]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "A loop?"},
]


def register_lm(root: str | Path, name: str = "tiny-lm", seed: int = 0) -> ModelVersion:
    """An untrained (seeded) 1-layer `causal_lm` on bytes, registered the way training does.
    Untied embeddings, so greedy text varies (bytes, invalid UTF-8, an early end of text)."""
    pre = TextPreprocessor(ByteTokenizer(), block_size=CONTEXT, text_column="text")
    options = {"n_layers": 1, "n_heads": 2, "d_model": 32, "tied_embeddings": False}
    torch.manual_seed(seed)
    module = build_model(
        ModelSpec.model_validate({"kind": "causal_lm", **options}), pre.input_schema()
    )
    document = {
        "kind": "causal_lm",
        "options": options,
        "task": "language_modeling",
        "input_schema": pre.input_schema(),
        "weights": "model.safetensors",
        "format": 1,
    }
    documents = {"model.json": document, "preprocessing.json": pre.to_dict()}
    return Registry(str(root)).register(name, module.state_dict(), documents)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`tiny-lm:1` (a language model) and `tab:1` (a tabular classifier)."""
    root = str(tmp_path_factory.mktemp("lm") / "registry")
    register_lm(root)
    table = pa.table({"x": [0.0, 1.0, 2.0, 3.0], "label": [0, 1, 0, 1]})
    register_tiny_model(root, table, name="tab")
    return root


@pytest.fixture(scope="module")
def predictor(registry: str) -> LMPredictor:
    return LMPredictor(registry, "tiny-lm:1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(registry: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The LM (its own LMServer deployment: streaming through a real deployment handle) and a
    tabular model behind one ingress, with a bearer token."""
    from ray import serve

    from kiln.inference.serve import build_app, http_options
    from kiln.inference.serve_spec import validate_serve_spec

    folder = tmp_path_factory.mktemp("lm-spec")
    (folder / "token").write_text(TOKEN)
    raw = {
        "registry": registry,
        "http": {"host": "127.0.0.1", "port": free_port()},
        "auth": {"token_file": str(folder / "token")},
        "ingress": {"num_cpus": 0.1},
        "models": [
            {"ref": "tiny-lm:1", "ray_actor_options": {"num_cpus": 0.25}},
            {"ref": "tab:1", "ray_actor_options": {"num_cpus": 0.1}},
        ],
    }
    (folder / "serve.yaml").write_text(yaml.safe_dump(raw))
    spec = validate_serve_spec(raw)
    serve.start(http_options=http_options(spec))
    try:
        serve.run(build_app(raw), name="lm", route_prefix="/")
        yield f"http://127.0.0.1:{spec.http.port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=TOKEN, max_retries=0, timeout=TIMEOUT)


def greedy(
    predictor: LMPredictor, prompt: str, max_tokens: int, stop: list[str] | None = None
) -> Any:
    request = GenerationRequest(prompt, max_tokens=max_tokens, temperature=0.0, stop=stop or [])
    return predictor.complete(request)


# ---- completions ---------------------------------------------------------------------------------


def test_completions_streamed_or_not_match_the_predictor(
    client: openai.OpenAI, predictor: LMPredictor
) -> None:
    for prompt in PROMPTS:
        expected = greedy(predictor, prompt, 12)
        answer = client.completions.create(
            model="tiny-lm", prompt=prompt, max_tokens=12, temperature=0
        )
        [choice] = answer.choices
        assert (choice.text, choice.finish_reason) == (expected.text, expected.finish_reason)
        assert answer.model == "tiny-lm:1" and answer.id.startswith("cmpl-")
        assert answer.usage is not None
        assert answer.usage.prompt_tokens == len(predictor.encode_prompt(prompt))
        assert answer.usage.completion_tokens == expected.completion_tokens
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + expected.completion_tokens

        chunks = list(
            client.completions.create(
                model="tiny-lm",
                prompt=prompt,
                max_tokens=12,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == expected.text
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == expected.finish_reason and set(finishes[:-1]) <= {None}
        assert chunks[-1].choices == [] and chunks[-1].usage == answer.usage
        assert len({c.id for c in chunks}) == 1


def test_a_list_of_prompts_gets_one_choice_each_and_seeds_repeat(
    client: openai.OpenAI, predictor: LMPredictor
) -> None:
    answer = client.completions.create(
        model="tiny-lm", prompt=PROMPTS, max_tokens=6, temperature=0, stop=["\n"]
    )
    expected = [greedy(predictor, p, 6, ["\n"]) for p in PROMPTS]
    assert [c.text for c in answer.choices] == [e.text for e in expected]
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert answer.usage is not None
    assert answer.usage.completion_tokens == sum(e.completion_tokens for e in expected)

    def sampled(seed: int) -> str:
        return (
            client.completions.create(
                model="tiny-lm:1", prompt="x = ", max_tokens=10, temperature=1.0, seed=seed
            )
            .choices[0]
            .text
        )

    assert sampled(7) == sampled(7)
    assert len({sampled(seed) for seed in range(4)}) > 1


# ---- chat ----------------------------------------------------------------------------------------


def test_chat_streamed_or_not_matches_the_predictor(
    client: openai.OpenAI, predictor: LMPredictor
) -> None:
    prompt = predictor.render_chat(MESSAGES)
    expected = greedy(predictor, prompt, 10, predictor.chat_template.stop)
    answer = client.chat.completions.create(
        model="tiny-lm", messages=MESSAGES, max_completion_tokens=10, temperature=0
    )
    [choice] = answer.choices
    assert (choice.message.role, choice.message.content) == ("assistant", expected.text)
    assert choice.finish_reason == expected.finish_reason
    assert answer.id.startswith("chatcmpl-") and answer.model == "tiny-lm:1"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
        expected.prompt_tokens,
        expected.completion_tokens,
    )

    stream = client.chat.completions.create(
        model="tiny-lm", messages=MESSAGES, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


# ---- models and errors ---------------------------------------------------------------------------


def test_models_lists_the_language_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-lm"]
    [model] = models.data
    assert model.owned_by == "kiln" and model.created > 0
    assert client.models.retrieve("tiny-lm").id == "tiny-lm"


def test_bad_requests_get_openai_errors(client: openai.OpenAI, server: str) -> None:
    def refused(kind: type[Exception], **request: Any) -> Any:
        create = client.chat.completions.create if "messages" in request else None
        with pytest.raises(kind) as info:
            (create or client.completions.create)(**request)
        return info.value

    unknown = refused(openai.NotFoundError, model="nope", prompt="x")
    assert unknown.body["code"] == "model_not_found" and "tiny-lm" in unknown.body["message"]
    zero = refused(openai.BadRequestError, model="tiny-lm", prompt="x", max_tokens=0)
    assert zero.body["param"] == "max_tokens"
    huge = refused(openai.BadRequestError, model="tiny-lm", prompt="x", max_tokens=1000)
    assert (huge.body["param"], huge.body["code"]) == ("max_tokens", "context_length_exceeded")
    assert "context length of 128 tokens" in huge.body["message"]
    long = refused(openai.BadRequestError, model="tiny-lm", prompt="y" * 200, stream=True)
    assert long.body["param"] == "prompt"
    role = refused(
        openai.BadRequestError, model="tiny-lm", messages=[{"role": "robot", "content": "hi"}]
    )
    assert role.body["param"] == "messages[0].role"
    empty = refused(openai.BadRequestError, model="tiny-lm", messages=[])
    assert empty.body["param"] == "messages"
    several = refused(openai.BadRequestError, model="tiny-lm", prompt="x", n=2)
    assert several.body["param"] == "n"
    tabular = refused(openai.BadRequestError, model="tab", prompt="x")
    assert "not a language model" in tabular.body["message"]

    anonymous = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.completions.create(model="tiny-lm", prompt="x")
    raw = requests.post(f"{server}/v1/completions", json={"model": "tiny-lm"}, timeout=TIMEOUT)
    assert raw.status_code == 401
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}

    auth = {"Authorization": f"Bearer {TOKEN}"}
    big = {"model": "tiny-lm", "prompt": "x" * 1_100_000}
    too_big = requests.post(f"{server}/v1/completions", json=big, headers=auth, timeout=TIMEOUT)
    assert too_big.status_code == 413
    assert too_big.json()["error"]["code"] == "request_too_large"
    wrong_route = requests.post(
        f"{server}/v1/models/tiny-lm:predict", json={"instances": [{}]}, headers=auth, timeout=9
    )
    assert wrong_route.status_code == 400 and "/v1/completions" in wrong_route.json()["error"]
    # The server keeps serving after all that.
    assert client.completions.create(model="tiny-lm", prompt="x", max_tokens=2).choices


def test_metrics_per_route_and_generated_tokens(client: openai.OpenAI) -> None:
    """The OpenAI routes report kiln's request metrics (route completions/chat) and the LM
    replicas count generated tokens, on Ray's Prometheus endpoint."""
    import ray

    client.chat.completions.create(model="tiny-lm", messages=MESSAGES, max_tokens=2)
    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = [
        r'ray_kiln_requests_total\{[^}]*code="200"[^}]*model="tiny-lm"[^}]*route="completions"',
        r'ray_kiln_requests_total\{[^}]*code="200"[^}]*route="chat"[^}]*version="1"',
        r'ray_kiln_request_errors_total\{[^}]*code="400"[^}]*route="completions"',
        r'ray_kiln_generated_tokens_total\{[^}]*model="tiny-lm"',
    ]
    deadline, text = time.monotonic() + 30, ""
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT).text
        if all(re.search(pattern, text) for pattern in wanted):
            break
        time.sleep(1)
    assert [pattern for pattern in wanted if not re.search(pattern, text)] == []


# ---- one model inside the ingress, and its health check ------------------------------------------


def test_a_colocated_language_model_streams_the_same_text(
    server: str, registry: str, predictor: LMPredictor
) -> None:
    from ray import serve

    from kiln.inference.serve import build_app

    spec = {
        "name": "solo-lm",
        "route_prefix": "/solo",
        "registry": registry,
        "models": [{"ref": "tiny-lm:1", "ray_actor_options": {"num_cpus": 0.1}}],
    }
    serve.run(build_app(spec), name="solo-lm", route_prefix="/solo")
    try:
        assert set(serve.status().applications["solo-lm"].deployments) == {"kiln-ingress"}
        solo = openai.OpenAI(base_url=f"{server}/solo/v1", api_key="-", max_retries=0)
        expected = greedy(predictor, PROMPTS[0], 20)
        plain = solo.completions.create(
            model="tiny-lm", prompt=PROMPTS[0], max_tokens=20, temperature=0
        )
        assert plain.choices[0].text == expected.text
        stream = solo.completions.create(
            model="tiny-lm", prompt=PROMPTS[0], max_tokens=20, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in stream) == expected.text
    finally:
        serve.delete("solo-lm")


def test_the_health_check_generates_a_token(registry: str) -> None:
    from kiln.inference.serve import LMServer

    server = LMServer(registry, "tiny-lm:1", "tiny-lm", "cpu")
    server.check_health()

    def broken(_ids: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("weights gone")

    server.predictor.module.forward = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="weights gone"):
        server.check_health()


def test_a_slow_generation_answers_504_and_is_cancelled() -> None:
    from kiln.inference.oip import RequestError
    from kiln.inference.serve import Ingress

    class Slow:
        cancelled = False

        def __await__(self) -> Any:
            return asyncio.sleep(5).__await__()

        def cancel(self) -> None:
            Slow.cancelled = True

    handle = SimpleNamespace(complete=SimpleNamespace(remote=lambda _request: Slow()))
    schema = {"task": "language_modeling", "features": ["text"], "vocab_size": 257}
    variant = {"ref": "tiny-lm:1", "weight": 1, "schema": schema, "handle": handle}
    spec = {"models": [{"ref": "tiny-lm:1"}], "limits": {"request_timeout_s": 0.2}}
    ingress = Ingress(spec, [{"name": "tiny-lm", "variants": [variant]}])
    chosen = ingress._lm_variant("tiny-lm", {})
    with pytest.raises(RequestError, match=r"tiny-lm:1: no answer within 0.2 s") as info:
        asyncio.run(ingress._generate(chosen, {"prompt": "x", "max_tokens": 4}))
    assert info.value.status == 504 and Slow.cancelled


def test_closing_a_stream_stops_the_generation(registry: str) -> None:
    """A client that goes away mid-stream: the replica's generating thread stops at the next
    token instead of running to max_tokens."""
    from kiln.inference.serve import LMServer

    server = LMServer(registry, "tiny-lm:1", "tiny-lm", "cpu")
    produced: list[int] = []
    real = server.predictor.stream

    def slow(request: GenerationRequest) -> Any:
        for piece in real(request):
            produced.append(1)
            time.sleep(0.02)
            yield piece

    server.predictor.stream = slow  # type: ignore[method-assign]

    async def read_two_then_leave() -> None:
        stream = server.stream({"prompt": "x", "max_tokens": 100, "temperature": 1.0, "seed": 1})
        assert "delta" in await stream.__anext__()
        await stream.__anext__()
        await stream.aclose()
        await asyncio.sleep(0.3)

    asyncio.run(read_two_then_leave())
    count = len(produced)
    time.sleep(0.2)
    assert len(produced) == count < 20


# ---- batch generation ----------------------------------------------------------------------------


def test_batch_generation_matches_the_predictor_and_sets_bad_rows_aside(
    registry: str, predictor: LMPredictor, tmp_path: Path
) -> None:
    prompts = [*PROMPTS, None, "z" * 150]
    pq.write_table(
        pa.table({"id": [10, 11, 12, 13, 14], "prompt": prompts}), tmp_path / "p.parquet"
    )
    out = tmp_path / "gen"
    options = GenerateOptions(max_tokens=8)
    summary = score(
        "tiny-lm",
        registry=registry,
        input=str(tmp_path / "p.parquet"),
        output=str(out),
        task="generate",
        generate=options,
        key="id",
        on_error="quarantine",
        batch_size=2,
    )
    assert (summary.rows_in, summary.rows_out, summary.rows_quarantined) == (5, 3, 2)
    result = pq.read_table(out).sort_by("id")
    assert result.column_names == [
        "id",
        "prompt",
        "completion",
        "prompt_tokens",
        "completion_tokens",
        "finish_reason",
        "model",
    ]
    expected = [greedy(predictor, p, 8) for p in PROMPTS]
    assert result["completion"].to_pylist() == [e.text for e in expected]
    assert result["completion_tokens"].to_pylist() == [e.completion_tokens for e in expected]
    assert result["prompt_tokens"].to_pylist() == [e.prompt_tokens for e in expected]
    assert set(result["model"].to_pylist()) == {"tiny-lm:1"}
    errors = pq.read_table(out / "_errors").sort_by("row").to_pylist()
    assert [(e["id"], e["row"]) for e in errors] == [("13", 3), ("14", 4)]
    assert "is null" in errors[0]["reason"] and "context length" in errors[1]["reason"]

    with pytest.raises(DataError, match=r"p\.parquet: row 3: prompt column 'prompt' is null"):
        score(
            "tiny-lm",
            registry=registry,
            input=str(tmp_path / "p.parquet"),
            output=str(tmp_path / "fails"),
            task="generate",
            generate=GenerateOptions(max_tokens=8, prompt_column="prompt"),
            key="id",
        )
    assert not (tmp_path / "fails").exists()


def test_the_task_must_fit_the_model(registry: str, tmp_path: Path) -> None:
    pq.write_table(pa.table({"prompt": ["a"], "x": [1.0]}), tmp_path / "in.parquet")
    common = {"registry": registry, "input": str(tmp_path / "in.parquet")}
    with pytest.raises(KilnError, match="tiny-lm:1 is a language model: generate with it"):
        score("tiny-lm", output=str(tmp_path / "a"), **common)
    with pytest.raises(KilnError, match="--task generate needs a language model; tab:1"):
        score("tab", output=str(tmp_path / "b"), task="generate", **common)
    with pytest.raises(DataError, match="column 'text' not found"):
        score(
            "tiny-lm",
            output=str(tmp_path / "c"),
            task="generate",
            generate=GenerateOptions(prompt_column="text"),
            **common,
        )
