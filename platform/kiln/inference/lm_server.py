"""Serving a language model: the `LMServer` replica (an `LMPredictor` generating in worker
threads, streaming) and the server-sent events the ingress builds from its stream.

The ingress (`kiln.inference.serve`) speaks HTTP and the OpenAI protocol (`openai_api`); this
module turns requests into generations and generations into events.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Generator
from contextlib import closing, suppress
from dataclasses import asdict
from typing import Any

from ray.serve.exceptions import RayServeException

from kiln import metrics as kiln_metrics
from kiln.errors import DataError
from kiln.inference import openai_api
from kiln.inference.lm import Completion, GenerationRequest, LMPredictor
from kiln.inference.oip import RequestError
from kiln.inference.openai_api import APIError, ChatRequest, CompletionRequest, Generated

HEALTH_PROMPT = "def "
"""The fixed prompt an LM replica's health check generates one token from."""
_END = object()  # the end of a stream, from the generating thread


class LMServer:
    """One registered language model version: generation in worker threads, so the replica's
    event loop keeps taking requests and streaming tokens.

    Requests are dicts (see `openai_api.CompletionRequest.generation` and
    `ChatRequest.generation`): `prompt` or `messages`, `max_tokens` (None for a chat: the rest of
    the context), `temperature`, `top_p`, `stop`, `seed`. A request the model cannot serve answers
    `{"error", "param", "code"}` instead of text.

    Args:
        registry: registry root.
        ref: exact `name:version`.
        served_name: the model's name in requests and metric tags.
        device: torch device.
    """

    def __init__(self, registry: str, ref: str, served_name: str, device: str) -> None:
        self.predictor = LMPredictor(registry, ref, device=device)
        self.ref = self.predictor.ref
        self._tags = {"model": served_name, "version": self.ref.rsplit(":", 1)[1]}
        self._generating = threading.Lock()
        self._tokens = kiln_metrics.create("kiln_generated_tokens", serve=True)
        self._queue_depth = kiln_metrics.create("kiln_queue_depth", serve=True)
        self._queued = 0  # requests in stream(): one event loop, so no lock
        self._queue_depth.set(0, tags=self._tags)
        kiln_metrics.create("kiln_replica_up", serve=True).set(1, tags=self._tags)

    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        """The whole completion: `{"text", "prompt_tokens", "completion_tokens",
        "finish_reason"}`, or `{"error", ...}`. Cancelling the call stops the generation."""
        last: dict[str, Any] = {}
        # Only the result crosses to the event loop: a hand-off per token cost ~20% here.
        async for item in self.stream(request, deltas=False):
            last = item
        return last.get("done", last)

    async def stream(
        self, request: dict[str, Any], deltas: bool = True
    ) -> AsyncIterator[dict[str, Any]]:
        """`{"delta": text}` pieces (unless `deltas` is false), then `{"done": completion}`;
        or one `{"error", ...}`.

        One thread generates the whole request (torch's inference mode is per thread) and hands
        pieces to the event loop; closing this generator stops it at the next token. A replica
        generates one request at a time: concurrent generations in threads contend for the
        GIL and together ran 2.5x slower than one after another (benchmarks/lm.py); more
        throughput comes from more replicas (autoscaling).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def put(item: Any) -> None:
            with suppress(RuntimeError):  # the event loop closed: the replica is stopping
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def produce() -> None:
            try:
                with self._generating, closing(self._pieces(request)) as pieces:
                    for piece in pieces:
                        if stop.is_set():
                            return
                        if deltas or "delta" not in piece:
                            put(piece)
            except DataError as exc:
                put(refusal(exc, request))
            except BaseException as exc:  # re-raised in the caller's task
                put(exc)
            finally:
                put(_END)

        self._queued += 1
        self._queue_depth.set(self._queued, tags=self._tags)
        threading.Thread(target=produce, name="kiln-generate", daemon=True).start()
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            self._queued -= 1
            self._queue_depth.set(self._queued, tags=self._tags)

    def _pieces(self, request: dict[str, Any]) -> Generator[dict[str, Any], None, None]:
        for piece in self.predictor.stream(self._generation_request(request)):
            if isinstance(piece, Completion):
                self._tokens.inc(piece.completion_tokens, tags=self._tags)
                yield {"done": asdict(piece)}
            else:
                yield {"delta": piece}

    def _generation_request(self, request: dict[str, Any]) -> GenerationRequest:
        """An LM GenerationRequest; a chat is rendered with the model's template, whose stop
        strings end the assistant's turn."""
        stop = list(request.get("stop") or [])
        max_tokens = request.get("max_tokens")
        field = "messages" if "messages" in request else "prompt"
        if field == "messages":
            prompt = self.predictor.render_chat(request["messages"])
            stop += [s for s in self.predictor.chat_template.stop if s not in stop]
        else:
            prompt = request["prompt"]
        context = self.predictor.context_length
        room = context - len(self.predictor.encode_prompt(prompt))
        if room < 1:
            raise DataError(
                f"{field}: {context - room} tokens fill the model's whole context of {context} "
                "tokens, leaving none to generate; shorten it"
            )
        if max_tokens is None:
            max_tokens = room
        return GenerationRequest(
            prompt=prompt,
            max_tokens=int(max_tokens),
            temperature=float(request.get("temperature", 1.0)),
            top_p=request.get("top_p"),
            stop=stop,
            seed=request.get("seed"),
        )

    def ping(self) -> str:
        """The exact ref served (readiness)."""
        return self.ref

    def check_health(self) -> None:
        """Serve's health check: the model must still generate a token from a fixed prompt."""
        probe = GenerationRequest(prompt=HEALTH_PROMPT, max_tokens=1, temperature=0.0)
        result = self.predictor.complete(probe)
        if result.completion_tokens > 1:
            raise RuntimeError(f"{self.ref}: the health probe generated more than one token")


_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "messages", "prompt", "stop", "seed")


def refusal(exc: DataError, request: dict[str, Any]) -> dict[str, Any]:
    """A refused generation request: the message, the request field it names (e.g. `max_tokens`,
    `messages[1].role`) and a code."""
    message = str(exc)
    head = message.split(" ", 1)[0].split(":", 1)[0]
    param = head if head.split("[", 1)[0] in _PARAMS else None
    code = None
    if "context" in message:
        code = "context_length_exceeded"
        if not message.startswith(("prompt:", "messages:")):
            param = "max_tokens"  # the prompt alone fits (checked first): max_tokens does not
    if param == "prompt" and "messages" in request:
        param = "messages"
    return {"error": message, "param": param, "code": code}


async def next_piece(pieces: Any) -> dict[str, Any]:
    """The next item of an LM server's stream (a deployment response generator)."""
    try:
        first: dict[str, Any] = await pieces.__anext__()
    except StopAsyncIteration:
        raise RuntimeError("the LM server's stream ended without output") from None
    return first


def refused(result: dict[str, Any]) -> APIError:
    """The 400 for a generation request the model refused (prompt too long, bad parameter)."""
    return APIError(400, str(result["error"]), param=result.get("param"), code=result.get("code"))


class EventStream:
    """The server-sent events of one streamed completion or chat reply.

    Args:
        model: `name:version`, the chunks' `model`.
        ref: the registry ref, for error messages.
        pieces: the LM server's stream (its first item already taken: `first`).
        parsed: the request (for `stream_options.include_usage`).
        chat: chat chunks (`delta`) rather than completion chunks (`text`).
        deadline: `time.monotonic()` by which the stream must end.
    """

    def __init__(
        self,
        model: str,
        ref: str,
        pieces: Any,
        first: dict[str, Any],
        parsed: CompletionRequest | ChatRequest,
        chat: bool,
        deadline: float,
    ) -> None:
        self.model, self.ref, self.pieces, self.first = model, ref, pieces, first
        self.include_usage, self.chat, self.deadline = parsed.include_usage, chat, deadline
        self.id = openai_api.new_id("chatcmpl" if chat else "cmpl")
        self.created = openai_api.now()

    def _chunk(self, text: str | None, finish_reason: str | None = None) -> bytes:
        model = self.model
        if self.chat:
            delta = {} if text is None else {"content": text}
            document = openai_api.chat_chunk(self.id, self.created, model, delta, finish_reason)
        else:
            document = openai_api.completion_chunk(
                self.id, self.created, model, text or "", finish_reason
            )
        return openai_api.sse(document)

    async def run(self) -> AsyncIterator[bytes]:
        """Chunks until the final one (finish_reason, then usage if asked), then `[DONE]`; a
        failure mid-stream is one `{"error": ...}` event. Stopping early cancels generation."""
        finished = False
        try:
            if self.chat:
                role = {"role": "assistant", "content": ""}
                yield openai_api.sse(openai_api.chat_chunk(self.id, self.created, self.model, role))
            item = self.first
            while "delta" in item:
                yield self._chunk(item["delta"])
                item = await self._next()
            finished = True
            if "done" not in item:
                yield openai_api.sse(openai_api.error_of(refused(item)))
                return
            result = Generated.from_dict(item["done"])
            yield self._chunk(None, result.finish_reason)
            if self.include_usage:
                kind = "chat.completion.chunk" if self.chat else "text_completion"
                document = openai_api.usage_chunk(self.id, self.created, self.model, kind, result)
                yield openai_api.sse(document)
            yield openai_api.SSE_DONE
        except RequestError as exc:
            yield openai_api.sse(openai_api.error_of(exc))
        finally:
            if not finished:
                self.pieces.cancel()

    async def _next(self) -> dict[str, Any]:
        remaining = self.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(next_piece(self.pieces), max(remaining, 0.0))
        except asyncio.TimeoutError:
            raise RequestError(504, f"{self.ref}: the stream ran past the time limit") from None
        except RayServeException as exc:
            raise RequestError(503, f"{self.ref} is unavailable: {exc}") from None
