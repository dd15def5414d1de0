"""Online serving on Ray Serve: registered models behind one FastAPI ingress.

One model deployment per served model version, autoscaled: a `ModelServer` (a `Predictor` with
dynamic request batching) for a tabular model, an `LMServer` (an `LMPredictor` generating in
worker threads, streaming) for a language model. One `Ingress` deployment speaks HTTP: the Open
Inference Protocol v2 under `/v2` and a JSON `:predict` route under `/v1` for tabular models, the
OpenAI-compatible `/v1/completions`, `/v1/chat/completions` and `/v1/models` for language models
(see `openai_api`), with bearer-token auth, body and time limits, validation, the weighted
canary split and error mapping for all of them. `build_app` turns a serve spec into the
application; it is also the `import_path` of the Serve config that `serve_config` writes.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import numpy as np
import pyarrow as pa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.deployment import Application, Deployment
from ray.serve.exceptions import BackPressureError, RayServeException
from starlette.exceptions import HTTPException

from kiln import __version__
from kiln import metrics as kiln_metrics
from kiln.errors import DataError, RegistryError
from kiln.inference import oip, openai_api
from kiln.inference.lm import LANGUAGE_MODELING
from kiln.inference.lm_server import EventStream, LMServer, next_piece, refused
from kiln.inference.oip import ModelInfo, RequestError
from kiln.inference.openai_api import APIError, ChatRequest, CompletionRequest, Generated
from kiln.inference.predictor import Predictor
from kiln.inference.serve_spec import (
    ModelServeSpec,
    ServeSpec,
    load_token,
    validate_serve_spec,
)
from kiln.monitor.client import MonitorError, parse_window
from kiln.monitor.profile import PROFILE_FILE
from kiln.monitor.store import DriftRecorder
from kiln.registry import Registry
from kiln.storage import is_uri

logger = logging.getLogger(__name__)

IMPORT_PATH = "kiln.inference.serve:build_app"
INGRESS = "kiln-ingress"
_READY_CACHE_S = 2.0
# A batch whose forward pass (preprocessing included) takes less than this, on average, runs on
# the replica's event loop: handing it to a thread and back would cost more than it frees.
_INLINE_FORWARD_S = 0.002


# ---- the model replica -------------------------------------------------------------------------


class ModelServer:
    """One registered model version: a Predictor with dynamic request batching.

    Args:
        registry: registry root.
        ref: exact `name:version` (aliases are resolved by `build_app`, so replicas agree).
        served_name: the model's name in URLs and metric tags.
        device: torch device.
        max_batch_size, batch_wait_timeout_s: `@serve.batch` settings.
    """

    def __init__(
        self,
        registry: str,
        ref: str,
        served_name: str,
        device: str,
        max_batch_size: int,
        batch_wait_timeout_s: float,
    ) -> None:
        self.predictor = Predictor(registry, ref, device=device)
        self.ref = self.predictor.ref
        batcher: Any = self._predict_batch
        batcher.set_max_batch_size(max_batch_size)
        batcher.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._tags = {"model": served_name, "version": self.ref.rsplit(":", 1)[1]}
        self._batch_size = kiln_metrics.create("kiln_batch_size", serve=True)
        self._queue_depth = kiln_metrics.create("kiln_queue_depth", serve=True)
        self._queued = 0  # requests in predict(): one event loop, so no lock
        self._queue_depth.set(0, tags=self._tags)
        kiln_metrics.create("kiln_replica_up", serve=True).set(1, tags=self._tags)
        self._probe = _probe_table(self.predictor.schema)
        self._forward_s = math.inf  # moving average; the first batch runs in a thread

    async def predict(self, table: pa.Table) -> dict[str, Any]:
        """Predictions for one request's rows, or `{"error": message}` for rows the model cannot
        score (the other requests of the batch are unaffected)."""
        self._queued += 1
        self._queue_depth.set(self._queued, tags=self._tags)
        try:
            return await self._predict_batch(table)
        finally:
            self._queued -= 1
            self._queue_depth.set(self._queued, tags=self._tags)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _predict_batch(self, tables: list[pa.Table]) -> list[dict[str, Any]]:
        self._batch_size.observe(len(tables), tags=self._tags)
        return await self._forward(tables)

    async def _forward(self, tables: list[pa.Table]) -> list[dict[str, Any]]:
        if self._forward_s < _INLINE_FORWARD_S:
            return self._timed_batch(tables)
        # A worker thread runs a longer forward pass, so the event loop keeps filling the next
        # batch (and answering health checks) meanwhile.
        return await asyncio.to_thread(self._timed_batch, tables)

    def _timed_batch(self, tables: list[pa.Table]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        try:
            return self._run_batch(tables)
        finally:
            elapsed = time.perf_counter() - start
            previous = self._forward_s
            self._forward_s = elapsed if math.isinf(previous) else 0.8 * previous + 0.2 * elapsed

    def _run_batch(self, tables: list[pa.Table]) -> list[dict[str, Any]]:
        try:
            merged = self.predictor.predict_table(pa.concat_tables(tables))
        except DataError as exc:
            if len(tables) == 1:
                return [{"error": str(exc)}]
            return [self._run_batch([table])[0] for table in tables]
        results, start = [], 0
        for table in tables:
            stop = start + table.num_rows
            results.append({key: value[start:stop] for key, value in merged.items()})
            start = stop
        return results

    def ping(self) -> str:
        """The exact ref served (readiness)."""
        return self.ref

    def check_health(self) -> None:
        """Serve's health check: the model must still predict finite outputs for a probe row."""
        out = self.predictor.predict_table(self._probe)
        for key, value in out.items():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise RuntimeError(f"{self.ref}: the probe row predicts a non-finite {key}")


def _probe_table(schema: dict[str, Any]) -> pa.Table:
    categorical = set(schema.get("categorical") or ())
    return pa.table(
        {
            f: pa.array([""], pa.string()) if f in categorical else pa.array([0.0])
            for f in schema["features"]
        }
    )


# ---- the HTTP ingress --------------------------------------------------------------------------

app = FastAPI(
    title="kiln model server",
    version=__version__,
    description="Tabular models: the Open Inference Protocol v2 (KServe V2 REST) under /v2 and "
    "a JSON :predict route under /v1. Language models: the OpenAI-compatible /v1/completions, "
    "/v1/chat/completions and /v1/models (streaming as server-sent events). Send "
    "`Authorization: Bearer <token>` when the server has a token.",
)


@app.exception_handler(RequestError)
async def _request_error(_request: Request, exc: RequestError) -> JSONResponse:
    headers = {"www-authenticate": "Bearer", **exc.headers} if exc.status == 401 else exc.headers
    return JSONResponse(oip.error_body(str(exc)), status_code=exc.status, headers=headers)


@app.exception_handler(HTTPException)
async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse(oip.error_body(str(exc.detail)), status_code=exc.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(oip.error_body(str(exc.errors())), status_code=400)


def _doc_responses(
    model: type, *codes: int, error: type = oip.ErrorDoc
) -> dict[int | str, dict[str, Any]]:
    errors: dict[int | str, dict[str, Any]] = {code: {"model": error} for code in codes}
    return {200: {"model": model}, **errors}


def _body_doc(model: type) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _openapi() -> dict[str, Any]:
    """FastAPI's document plus the request-body schemas (bodies are parsed by hand, so FastAPI
    does not see them)."""
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for model in (oip.InferRequestDoc, oip.PredictRequestDoc, CompletionRequest, ChatRequest):
        defs = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(defs.pop("$defs", {}))
        schemas[model.__name__] = defs
    app.openapi_schema = document
    return document


app.openapi = _openapi  # type: ignore[method-assign]
_ERRORS = (400, 401, 404, 413, 503, 504)


@dataclass
class _Variant:
    info: ModelInfo
    weight: float
    handle: Any
    created: int = 0
    """When the version was registered (Unix seconds), for `/v1/models`."""

    @property
    def is_lm(self) -> bool:
        """Whether this is a language model (served by the OpenAI-compatible routes)."""
        return self.info.task == LANGUAGE_MODELING

    @property
    def model_field(self) -> str:
        """`served-name:version`: the `model` of OpenAI-style answers."""
        return f"{self.info.name}:{self.info.version}"


@dataclass
class _Served:
    name: str
    variants: list[_Variant]

    def pick(self, version: str | None) -> _Variant:
        """The variant for an explicit version, else a weighted random one (the canary split)."""
        if version is None:
            weights = [v.weight for v in self.variants]
            return random.choices(self.variants, weights=weights)[0]
        for variant in self.variants:
            if variant.info.version == version:
                return variant
        served = ", ".join(v.info.version for v in self.variants)
        raise RequestError(
            404, f"model {self.name!r} has no version {version!r}; served versions: {served}"
        )


class _LocalMethod:
    """`method.remote(...)` of a deployment handle, for a ModelServer in this process."""

    def __init__(self, function: Any) -> None:
        self._function = function

    def remote(self, *args: Any) -> asyncio.Task[Any]:
        # A Task is awaitable and has cancel(), like a DeploymentResponse.
        return asyncio.ensure_future(self._function(*args))


class _LocalStream:
    """`handle.options(stream=True).method.remote(...)` for a server in this process: an async
    iterator with `cancel()`, like a DeploymentResponseGenerator."""

    def __init__(self, generator: Any) -> None:
        self._generator = generator
        self._closing: asyncio.Future[None] | None = None

    def __aiter__(self) -> _LocalStream:
        return self

    async def __anext__(self) -> Any:
        return await self._generator.__anext__()

    def cancel(self) -> None:
        self._closing = asyncio.ensure_future(self._generator.aclose())


class _LocalStreamMethod:
    def __init__(self, function: Any) -> None:
        self._function = function

    def remote(self, *args: Any) -> _LocalStream:
        return _LocalStream(self._function(*args))


class _LocalHandle:
    """A ModelServer or LMServer inside the ingress replica, called the way a deployment handle
    is (`options(stream=True)` included)."""

    def __init__(self, server: ModelServer | LMServer, streaming: bool = False) -> None:
        self.server = server
        self.ping = _LocalMethod(self._ping)
        if isinstance(server, LMServer):
            method: Any = _LocalStreamMethod if streaming else _LocalMethod
            self.complete = _LocalMethod(server.complete)
            self.stream = method(server.stream)
        else:
            self.predict = _LocalMethod(server.predict)

    def options(self, *, stream: bool = False) -> _LocalHandle:
        """The handle with streaming calls (`stream=True`), as DeploymentHandle.options."""
        return _LocalHandle(self.server, streaming=stream)

    async def _ping(self) -> str:
        return self.server.ping()


class Ingress:
    """HTTP in front of the model deployments: auth, limits, validation, canary, errors.

    Args:
        spec: the serve spec as JSON (`ServeSpec.model_dump(mode="json")`).
        routes: per served model, `{"name", "variants": [{"ref", "weight", "schema",
            "handle"}]}` with a deployment handle per version.
        colocated: ModelServer arguments when the one model runs inside this replica
            (`ingress.colocate`); its variant's handle is then None in `routes`.
    """

    def __init__(
        self,
        spec: dict[str, Any],
        routes: list[dict[str, Any]],
        colocated: dict[str, Any] | None = None,
    ) -> None:
        self.spec = validate_serve_spec(spec, "ingress spec")
        self._token = load_token(self.spec.auth)
        self._local = _colocated_handle(colocated, routes) if colocated else None
        self.models = {
            route["name"]: _Served(
                route["name"],
                [
                    _Variant(
                        ModelInfo.from_schema(route["name"], v["ref"], v["schema"]),
                        v["weight"],
                        self._local if v["handle"] is None else v["handle"],
                        int(v.get("created", 0)),
                    )
                    for v in route["variants"]
                ],
            )
            for route in routes
        }
        self._started = openai_api.now()
        self._ready_at: dict[str, float] = {}
        self._drift = _drift_recorder(self.spec, routes)
        self._requests = kiln_metrics.create("kiln_requests", serve=True)
        self._errors = kiln_metrics.create("kiln_request_errors", serve=True)
        self._latency = kiln_metrics.create("kiln_request_latency_ms", serve=True)

    def check_health(self) -> None:
        """Serve's health check: a colocated model must still predict finite outputs (a language
        model: generate a token)."""
        if self._local is not None:
            self._local.server.check_health()

    # ---- OIP: health and metadata ----------------------------------------------------------------

    @app.get("/v2/health/live", summary="Server liveness (OIP)")
    async def live(self) -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", summary="Server readiness: every model version answers (OIP)")
    async def ready(self) -> JSONResponse:
        variants = [v for served in self.models.values() for v in served.variants]
        states = await asyncio.gather(*(self._variant_ready(v) for v in variants))
        return JSONResponse({"ready": all(states)}, status_code=200 if all(states) else 503)

    @app.get("/v2", summary="Server metadata (OIP)")
    async def server_metadata(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"name": "kiln", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get(
        "/v2/models/{name}",
        summary="Model metadata: input and output tensors (OIP)",
        responses=_doc_responses(oip.ModelMetadataDoc, 401, 404),
    )
    async def model_metadata(self, name: str, request: Request) -> dict[str, Any]:
        self._authorize(request)
        served = self._served(name)
        _not_an_lm(served.variants[0])
        versions = list(dict.fromkeys(v.info.version for v in served.variants))
        return oip.model_metadata(served.variants[0].info, versions)

    @app.get(
        "/v2/models/{name}/versions/{version}",
        summary="Model version metadata (OIP)",
        responses=_doc_responses(oip.ModelMetadataDoc, 401, 404),
    )
    async def version_metadata(self, name: str, version: str, request: Request) -> dict[str, Any]:
        self._authorize(request)
        variant = self._served(name).pick(version)
        _not_an_lm(variant)
        return oip.model_metadata(variant.info, [variant.info.version])

    @app.get("/v2/models/{name}/ready", summary="Model readiness (OIP)")
    async def model_ready(self, name: str, request: Request) -> JSONResponse:
        self._authorize(request)
        served = self._served(name)
        states = await asyncio.gather(*(self._variant_ready(v) for v in served.variants))
        return JSONResponse({"name": name, "ready": all(states)}, 200 if all(states) else 503)

    @app.get("/v2/models/{name}/versions/{version}/ready", summary="Model version readiness")
    async def version_ready(self, name: str, version: str, request: Request) -> JSONResponse:
        self._authorize(request)
        variant = self._served(name).pick(version)
        state = await self._variant_ready(variant)
        return JSONResponse({"name": name, "ready": state}, 200 if state else 503)

    # ---- OIP: inference --------------------------------------------------------------------------

    @app.post(
        "/v2/models/{name}/infer",
        summary="Inference (OIP); the version follows the configured traffic split",
        responses=_doc_responses(oip.InferResponseDoc, *_ERRORS),
        openapi_extra=_body_doc(oip.InferRequestDoc),
    )
    async def infer(self, name: str, request: Request) -> Response:
        return await self._infer(name, None, request)

    @app.post(
        "/v2/models/{name}/versions/{version}/infer",
        summary="Inference on one model version (OIP)",
        responses=_doc_responses(oip.InferResponseDoc, *_ERRORS),
        openapi_extra=_body_doc(oip.InferRequestDoc),
    )
    async def infer_version(self, name: str, version: str, request: Request) -> Response:
        return await self._infer(name, version, request)

    # ---- JSON :predict ---------------------------------------------------------------------------

    @app.get(
        "/v1/models/{name}",
        summary="A model's features, classes and versions (a language model: its OpenAI model "
        "object, `models.retrieve`)",
    )
    async def describe(self, name: str, request: Request) -> Response:
        lm = self.models.get(openai_api.split_model(name)[0])
        if lm is not None and lm.variants[0].is_lm:

            async def retrieve(tags: dict[str, str]) -> Response:
                self._lm_variant(name, tags)  # a pinned version must exist
                return JSONResponse(self._model_object(lm))

            return await self._serve_openai(request, "models", retrieve)
        self._authorize(request)
        served = self._served(name)
        info = served.variants[0].info
        total = sum(v.weight for v in served.variants)
        document = {
            "name": name,
            "task": info.task,
            "features": list(info.features),
            "categorical": sorted(info.categorical),
            "classes": list(info.classes) if info.classes is not None else None,
            "versions": [
                {"version": v.info.version, "ref": v.info.ref, "traffic": v.weight / total}
                for v in served.variants
            ],
        }
        return JSONResponse(document)

    @app.post(
        "/v1/models/{name}:predict",
        summary="Predict rows given as JSON objects; the version follows the traffic split",
        responses=_doc_responses(oip.PredictResponseDoc, *_ERRORS),
        openapi_extra=_body_doc(oip.PredictRequestDoc),
    )
    async def predict(self, name: str, request: Request) -> Response:
        return await self._predict(name, None, request)

    @app.post(
        "/v1/models/{name}/versions/{version}:predict",
        summary="Predict rows with one model version",
        responses=_doc_responses(oip.PredictResponseDoc, *_ERRORS),
        openapi_extra=_body_doc(oip.PredictRequestDoc),
    )
    async def predict_version(self, name: str, version: str, request: Request) -> Response:
        return await self._predict(name, version, request)

    # ---- drift -----------------------------------------------------------------------------------

    @app.get(
        "/v1/models/{name}/drift",
        summary="Drift of the model's live inputs against its training profile: per feature PSI "
        "and KS, thresholds and flags, over the last `window` (e.g. 15m, 1h; default the serve "
        "spec's monitor.window_s), for one `version` or every served one",
        responses={401: {"model": oip.ErrorDoc}, 404: {"model": oip.ErrorDoc}},
    )
    async def drift(
        self, name: str, request: Request, window: str | None = None, version: str | None = None
    ) -> JSONResponse:
        self._authorize(request)
        served = self._served(name)
        variants = [served.pick(version)] if version else served.variants
        if variants[0].is_lm:
            raise RequestError(
                400,
                f"model {name!r} is a language model: its inputs are text, so it has no training "
                "profile to measure drift against",
            )
        watched = self._watched(variants)
        try:
            window_s = parse_window(window) if window else self.spec.monitor.window_s
        except MonitorError as exc:
            raise RequestError(400, str(exc).replace("--window", "window")) from None
        if window_s > self.spec.monitor.retention_s:
            retention = self.spec.monitor.retention_s
            raise RequestError(
                400, f"window: {window} exceeds monitor.retention_s ({retention:g} s)"
            )
        reports = await self._drift.query(name, watched, window_s) if self._drift else []
        document = {
            "model": name,
            "window": window or f"{window_s:g}s",
            "window_s": window_s,
            "versions": reports,
        }
        return JSONResponse(document)

    def _watched(self, variants: list[_Variant]) -> list[str]:
        """The versions whose inputs are counted (404 naming the first that is not)."""
        versions = list(dict.fromkeys(v.info.version for v in variants))
        for variant in variants:
            info = variant.info
            if self._drift is None or not self._drift.watches(info.name, info.version):
                raise RequestError(
                    404,
                    f"{variant.info.ref} is not monitored: it has no training profile "
                    f"({PROFILE_FILE}; models registered by kiln train have one) or the serve "
                    "spec sets monitor.enabled: false",
                )
        return versions

    # ---- OpenAI-compatible routes (language models) ----------------------------------------------

    @app.get(
        "/v1/models",
        summary="The served language models (OpenAI `models.list`)",
        responses=_doc_responses(openai_api.ModelListDoc, 401, error=openai_api.ErrorDoc),
    )
    async def list_models(self, request: Request) -> Response:
        async def handle(_tags: dict[str, str]) -> Response:
            data = [
                self._model_object(served)
                for served in self.models.values()
                if served.variants[0].is_lm
            ]
            return JSONResponse(openai_api.model_list(data))

        return await self._serve_openai(request, "models", handle)

    @app.post(
        "/v1/completions",
        summary="Complete a prompt (OpenAI-compatible; `stream: true` for server-sent events)",
        responses=_doc_responses(openai_api.CompletionDoc, *_ERRORS, error=openai_api.ErrorDoc),
        openapi_extra=_body_doc(CompletionRequest),
    )
    async def completions(self, request: Request) -> Response:
        async def handle(tags: dict[str, str]) -> Response:
            parsed = openai_api.parse_completion_request(await self._json(request))
            variant = self._lm_variant(parsed.model, tags)
            if parsed.stream:
                generation = parsed.generation(parsed.prompts[0])
                return await self._stream(variant, generation, parsed, chat=False)
            calls = [self._generate(variant, parsed.generation(p)) for p in parsed.prompts]
            results = await _all_or_none(calls)
            document = openai_api.completion_response(
                openai_api.new_id("cmpl"), openai_api.now(), variant.model_field, results
            )
            return JSONResponse(document, headers={"kiln-model": variant.model_field})

        return await self._serve_openai(request, "completions", handle)

    @app.post(
        "/v1/chat/completions",
        summary="The assistant's reply to a conversation (OpenAI-compatible; `stream: true` for "
        "server-sent events)",
        responses=_doc_responses(openai_api.ChatCompletionDoc, *_ERRORS, error=openai_api.ErrorDoc),
        openapi_extra=_body_doc(ChatRequest),
    )
    async def chat_completions(self, request: Request) -> Response:
        async def handle(tags: dict[str, str]) -> Response:
            parsed = openai_api.parse_chat_request(await self._json(request))
            variant = self._lm_variant(parsed.model, tags)
            if parsed.stream:
                return await self._stream(variant, parsed.generation(), parsed, chat=True)
            result = await self._generate(variant, parsed.generation())
            document = openai_api.chat_response(
                openai_api.new_id("chatcmpl"), openai_api.now(), variant.model_field, result
            )
            return JSONResponse(document, headers={"kiln-model": variant.model_field})

        return await self._serve_openai(request, "chat", handle)

    def _model_object(self, served: _Served) -> dict[str, Any]:
        total = sum(v.weight for v in served.variants)
        return openai_api.model_object(
            served.name,
            max((v.created for v in served.variants), default=0) or self._started,
            task=served.variants[0].info.task,
            versions=[
                {"version": v.info.version, "ref": v.info.ref, "traffic": v.weight / total}
                for v in served.variants
            ],
        )

    def _lm_variant(self, model: str, tags: dict[str, str]) -> _Variant:
        """The language model version a request's `model` field picks (404 for an unknown one,
        400 for a tabular model)."""
        name, version = openai_api.split_model(model)
        served = self.models.get(name)
        if served is None:
            known = ", ".join(sorted(n for n, s in self.models.items() if s.variants[0].is_lm))
            raise APIError(
                404,
                f"model {model!r} does not exist; served language models: {known or 'none'}",
                param="model",
                code="model_not_found",
            )
        try:
            variant = served.pick(version)
        except RequestError as exc:
            raise APIError(404, str(exc), param="model", code="model_not_found") from None
        tags.update(model=variant.info.name, version=variant.info.version)
        if not variant.is_lm:
            raise APIError(
                400,
                f"model {name!r} is a {variant.info.task} model, not a language model; use "
                f"POST /v1/models/{name}:predict or /v2/models/{name}/infer",
                param="model",
            )
        return variant

    async def _json(self, request: Request) -> Any:
        return oip.parse_json(await self._body(request))

    async def _generate(self, variant: _Variant, generation: dict[str, Any]) -> Generated:
        """One whole completion from the variant's LM server."""
        response = variant.handle.complete.remote(generation)
        result = await self._await_replica(variant, response, self.spec.limits.request_timeout_s)
        if "error" in result:
            raise refused(result)
        return Generated.from_dict(result)

    async def _stream(
        self,
        variant: _Variant,
        generation: dict[str, Any],
        parsed: CompletionRequest | ChatRequest,
        *,
        chat: bool,
    ) -> Response:
        """Server-sent events. The first piece is awaited before answering, so a request the
        model refuses still gets its 4xx status; the whole stream keeps to the time limit."""
        deadline = time.monotonic() + self.spec.limits.request_timeout_s
        pieces = variant.handle.options(stream=True).stream.remote(generation)
        try:
            first = await self._await_replica(
                variant, next_piece(pieces), deadline - time.monotonic()
            )
        except RequestError:
            pieces.cancel()
            raise
        if "error" in first:
            raise refused(first)
        model, ref = variant.model_field, variant.info.ref
        events = EventStream(model, ref, pieces, first, parsed, chat, deadline)
        headers = {"cache-control": "no-cache", "kiln-model": variant.model_field}
        return StreamingResponse(events.run(), media_type="text/event-stream", headers=headers)

    async def _serve_openai(self, request: Request, route: str, handle: Any) -> Response:
        """Like `_serve_request` for the OpenAI routes: failures answer OpenAI's error body."""
        start = time.perf_counter()
        tags = {"model": "-", "version": "-", "route": route}
        try:
            self._authorize(request)
            response: Response = await handle(tags)
        except RequestError as exc:
            headers = {"www-authenticate": "Bearer", **exc.headers} if exc.status == 401 else {}
            response = JSONResponse(
                openai_api.error_of(exc), status_code=exc.status, headers=headers or exc.headers
            )
        except Exception:
            logger.exception("OpenAI-compatible %s request failed", route)
            response = JSONResponse(openai_api.error_body(500, "internal error"), status_code=500)
        status = {**tags, "code": str(response.status_code)}
        self._requests.inc(tags=status)
        if response.status_code >= 400:
            self._errors.inc(tags=status)
        self._latency.observe((time.perf_counter() - start) * 1000, tags=tags)
        return response

    # ---- shared request path ---------------------------------------------------------------------

    async def _infer(self, name: str, version: str | None, request: Request) -> Response:
        async def handle(variant: _Variant, body: bytes) -> Response:
            header = request.headers.get(oip.HEADER_LENGTH)
            decoded = oip.decode_infer_request(body, variant.info, _header_int(header))
            result = await self._call(variant, decoded.table)
            content, headers = oip.encode_infer_response(variant.info, result, decoded)
            media_type = headers.pop("content-type")
            return Response(content, media_type=media_type, headers=headers)

        return await self._serve_request(name, version, request, "oip", handle)

    async def _predict(self, name: str, version: str | None, request: Request) -> Response:
        async def handle(variant: _Variant, body: bytes) -> Response:
            result = await self._call(variant, oip.decode_instances(body, variant.info))
            document = oip.encode_predictions(variant.info, result)
            return Response(oip.dumps(document), media_type="application/json")

        return await self._serve_request(name, version, request, "predict", handle)

    async def _serve_request(
        self, name: str, version: str | None, request: Request, route: str, handle: Any
    ) -> Response:
        """Auth, model and version choice, body limits, the call and its metrics; every failure
        becomes the protocol's error body."""
        start = time.perf_counter()
        tags = {"model": "-", "version": "-", "route": route}
        try:
            self._authorize(request)
            variant = self._served(name).pick(version)
            tags.update(model=variant.info.name, version=variant.info.version)
            _not_an_lm(variant)
            response: Response = await handle(variant, await self._body(request))
        except RequestError as exc:
            response = await _request_error(request, exc)
        except Exception:
            logger.exception("inference failed for model %s", tags["model"])
            response = JSONResponse(oip.error_body("internal error"), status_code=500)
        status = {**tags, "code": str(response.status_code)}
        self._requests.inc(tags=status)
        if response.status_code >= 400:
            self._errors.inc(tags=status)
        self._latency.observe((time.perf_counter() - start) * 1000, tags=tags)
        return response

    async def _call(self, variant: _Variant, table: pa.Table) -> dict[str, Any]:
        response = variant.handle.predict.remote(table)
        timeout = self.spec.limits.request_timeout_s
        result: dict[str, Any] = await self._await_replica(variant, response, timeout)
        if "error" in result:
            raise RequestError(400, str(result["error"]))
        for key, value in result.items():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise RequestError(500, f"{variant.info.ref} predicted a non-finite {key}")
        if self._drift is not None:  # inputs the model accepted: count them for drift
            self._drift.schedule(variant.info.name, variant.info.version, table)
        return result

    async def _await_replica(self, variant: _Variant, response: Any, timeout: float) -> Any:
        """A model replica's answer within `timeout` seconds; time-outs (the call is cancelled),
        overload and unavailable replicas become 504/503."""
        limit = self.spec.limits.request_timeout_s
        try:
            return await asyncio.wait_for(_resolve(response), max(timeout, 0.0))
        except asyncio.CancelledError:  # the caller went away: so does the replica's work
            if hasattr(response, "cancel"):
                response.cancel()
            raise
        except asyncio.TimeoutError:
            if hasattr(response, "cancel"):
                response.cancel()
            raise RequestError(504, f"{variant.info.ref}: no answer within {limit} s") from None
        except BackPressureError as exc:
            retry = {"retry-after": str(math.ceil(exc.retry_after_s or 1))}
            raise RequestError(
                503, f"{variant.info.ref} is overloaded; retry later", retry
            ) from None
        except RayServeException as exc:
            raise RequestError(503, f"{variant.info.ref} is unavailable: {exc}") from None

    async def _body(self, request: Request) -> bytes:
        limit = self.spec.limits.max_body_bytes
        length = _header_int(request.headers.get("content-length"))
        if length is not None and length > limit:
            raise RequestError(
                413, f"request body of {length} bytes exceeds the limit of {limit} bytes"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        encoding = request.headers.get("content-encoding")
        return oip.decode_content(b"".join(chunks), encoding, limit)

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self._token.encode()
        )
        if not ok:
            raise RequestError(401, "missing or invalid bearer token")

    def _served(self, name: str) -> _Served:
        served = self.models.get(name)
        if served is None:
            known = ", ".join(sorted(self.models))
            raise RequestError(404, f"unknown model {name!r}; served models: {known}")
        return served

    async def _variant_ready(self, variant: _Variant) -> bool:
        key = variant.info.ref
        if time.monotonic() - self._ready_at.get(key, -_READY_CACHE_S) < _READY_CACHE_S:
            return True
        try:
            await asyncio.wait_for(_resolve(variant.handle.ping.remote()), 2.0)
        except Exception:
            return False
        self._ready_at[key] = time.monotonic()
        return True


def _colocated_handle(args: dict[str, Any], routes: list[dict[str, Any]]) -> _LocalHandle:
    """The one model of a colocated application, built in this replica."""
    schema = routes[0]["variants"][0]["schema"]
    if schema.get("task") == LANGUAGE_MODELING:
        keys = ("registry", "ref", "served_name", "device")
        return _LocalHandle(LMServer(**{key: args[key] for key in keys}))
    return _LocalHandle(ModelServer(**args))


MODEL_SERVER = cast(Deployment, serve.deployment(ModelServer))
LM_SERVER = cast(Deployment, serve.deployment(LMServer))
INGRESS_SERVER = cast(Deployment, serve.deployment(serve.ingress(app)(Ingress)))


async def _resolve(response: Any) -> Any:
    return await response


async def _all_or_none(calls: list[Any]) -> list[Any]:
    """Every call's result; when one fails, the others are cancelled and its error raised."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


def _not_an_lm(variant: _Variant) -> None:
    """The tabular routes refuse a language model, pointing at the OpenAI-compatible ones."""
    if variant.is_lm:
        raise RequestError(
            400,
            f"model {variant.info.name!r} is a language model: use POST /v1/completions or "
            f'/v1/chat/completions with "model": "{variant.info.name}"',
        )


def _header_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise RequestError(400, f"header value {value!r} is not an integer") from None


# ---- building the application -------------------------------------------------------------------


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application for a serve spec (`import_path: kiln.inference.serve:build_app`,
    with the spec as `args`). Resolves every ref once, so all replicas serve the same versions.

    Raises:
        SpecError: the spec is invalid.
        RegistryError: a ref does not resolve.
    """
    spec = validate_serve_spec(args, "serve application args")
    spec = absolute_paths(spec)
    registry = Registry(spec.registry)
    routes, colocated = [], None
    for index, model in enumerate(spec.models):
        variants: list[dict[str, Any]] = []
        versions: dict[int, str] = {}
        for variant in model.variants:
            mv = registry.resolve(variant.ref)
            if mv.version in versions:
                # e.g. a canary alias promoted to production: harmless, but worth knowing.
                logger.warning(
                    "models.%d.versions: %s and %s both resolve to %s",
                    index,
                    versions[mv.version],
                    variant.ref,
                    mv.ref,
                )
            versions[mv.version] = variant.ref
            schema = registry.read_document(mv, "model.json")["input_schema"]
            server_args: dict[str, Any] = {
                "registry": spec.registry,
                "ref": mv.ref,
                "served_name": model.served_name,
                "device": "cuda" if model.ray_actor_options.num_gpus > 0 else "cpu",
            }
            is_lm = schema.get("task") == LANGUAGE_MODELING
            if not is_lm:  # generation is not batched across requests
                server_args["max_batch_size"] = model.batching.max_batch_size
                server_args["batch_wait_timeout_s"] = model.batching.batch_wait_timeout_s
            if spec.colocated:
                colocated, handle = server_args, None
            else:
                options = model_deployment_options(model, variant.ref)
                server = LM_SERVER if is_lm else MODEL_SERVER
                handle = server.options(**options).bind(**server_args)
            variants.append(
                {
                    "ref": mv.ref,
                    "weight": variant.weight,
                    "schema": schema,
                    "handle": handle,
                    "created": _unix_seconds(mv.created_at),
                    "profile": _profile(registry, mv) if not is_lm else None,
                }
            )
            logger.info(
                "%s: %s -> %s (weight %s)", model.served_name, variant.ref, mv.ref, variant.weight
            )
        routes.append({"name": model.served_name, "variants": variants})
    return INGRESS_SERVER.options(**ingress_deployment_options(spec)).bind(
        spec.model_dump(mode="json"), routes, colocated
    )


def _profile(registry: Registry, mv: Any) -> dict[str, Any] | None:
    """A version's training profile, None when it has none (registered before profiles)."""
    try:
        return registry.read_document(mv, PROFILE_FILE)
    except RegistryError:
        return None


def _drift_recorder(spec: ServeSpec, routes: list[dict[str, Any]]) -> DriftRecorder | None:
    """The drift recorder of the monitored versions (None when no version is monitored)."""
    versions = []
    for model, route in zip(spec.models, routes, strict=True):
        enabled, thresholds = spec.monitor.for_model(model.monitor)
        for variant in route["variants"] if enabled else []:
            if variant.get("profile"):
                versions.append(
                    {
                        "model": route["name"],
                        "version": variant["ref"].rsplit(":", 1)[1],
                        "ref": variant["ref"],
                        "profile": variant["profile"],
                        "thresholds": thresholds.to_dict(),
                    }
                )
    return DriftRecorder(spec.name, spec.monitor, versions) if versions else None


def _unix_seconds(iso: str) -> int:
    """A registry timestamp (ISO-8601) as Unix seconds; 0 when unreadable."""
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def absolute_paths(spec: ServeSpec) -> ServeSpec:
    """The spec with a local registry root and token file made absolute (replicas and the Serve
    controller do not share the caller's working directory)."""
    update: dict[str, Any] = {}
    if not is_uri(spec.registry):
        update["registry"] = os.path.abspath(spec.registry)
    if spec.auth.token_file:
        update["auth"] = spec.auth.model_copy(
            update={"token_file": os.path.abspath(spec.auth.token_file)}
        )
    return spec.model_copy(update=update)


def deployment_name(model: ModelServeSpec, ref: str) -> str:
    """The deployment of one served version: the ref as written, prefixed with the served name
    when that differs from the registered name (stable across alias moves)."""
    registered = ref.split("@", 1)[0].split(":", 1)[0]
    return ref if model.served_name == registered else f"{model.served_name}/{ref}"


def model_deployment_options(model: ModelServeSpec, ref: str) -> dict[str, Any]:
    """Serve options of one model version's deployment."""
    actor = model.ray_actor_options.model_dump(exclude_none=True)
    return {
        "name": deployment_name(model, ref),
        "max_ongoing_requests": model.max_ongoing_requests,
        "max_queued_requests": model.max_queued_requests,
        "autoscaling_config": model.autoscaling.serve_config(),
        "ray_actor_options": actor,
        "health_check_period_s": model.health_check_period_s,
    }


def ingress_deployment_options(spec: ServeSpec) -> dict[str, Any]:
    """Serve options of the ingress deployment; a colocated one takes its model's options."""
    if spec.colocated:
        model = spec.models[0]
        return {**model_deployment_options(model, model.variants[0].ref), "name": INGRESS}
    return {
        "name": INGRESS,
        "num_replicas": spec.ingress.num_replicas,
        "max_ongoing_requests": spec.ingress.max_ongoing_requests,
        "max_queued_requests": spec.ingress.max_queued_requests,
        "ray_actor_options": {"num_cpus": spec.ingress.num_cpus},
    }


def http_options(spec: ServeSpec) -> dict[str, Any]:
    """Serve proxy options. The proxy's own timeout sits past the ingress's, so a slow model
    answers the ingress's JSON 504 rather than the proxy's plain one."""
    return {
        "host": spec.http.host,
        "port": spec.http.port,
        "request_timeout_s": spec.limits.request_timeout_s + 5.0,
    }


def serve_config(spec: ServeSpec) -> dict[str, Any]:
    """A Serve config file (`serve deploy`, KubeRay RayService `serveConfigV2`) for the spec."""
    args = spec.model_dump(mode="json", exclude={"http"}, exclude_none=True)
    # A colocated model is part of the ingress deployment.
    deployments = (
        []
        if spec.colocated
        else [
            model_deployment_options(model, variant.ref)
            for model in spec.models
            for variant in model.variants
        ]
    )
    return {
        "proxy_location": "EveryNode",
        "http_options": http_options(spec),
        "applications": [
            {
                "name": spec.name,
                "route_prefix": spec.route_prefix,
                "import_path": IMPORT_PATH,
                "runtime_env": spec.runtime_env,
                "args": args,
                "deployments": [ingress_deployment_options(spec), *deployments],
            }
        ],
    }


__all__ = [
    "Ingress",
    "ModelServer",
    "build_app",
    "load_token",
    "serve_config",
]
