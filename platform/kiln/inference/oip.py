"""Request and response encoding for online serving: the Open Inference Protocol v2 (KServe V2
REST, with Triton's binary tensor extension) and kiln's JSON `:predict` route.

Pure functions over bytes, dicts and numpy/pyarrow; no Ray or web framework here, so every rule
is unit-testable. A bad request raises `RequestError` with the HTTP status and a message that
names the input, row or feature at fault.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, Field

from kiln.errors import KilnError

HEADER_LENGTH = "inference-header-content-length"
"""Triton's binary tensor extension: length of the JSON part of a request or response body."""

_NUMPY_TYPES = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPES = (*_NUMPY_TYPES, "BYTES")
_REQUEST_KEYS = {"id", "parameters", "inputs", "outputs"}
_INPUT_KEYS = {"name", "shape", "datatype", "parameters", "data"}
_MATRIX_INPUT = "input"


class RequestError(KilnError):
    """A request the server refuses; `status` is the HTTP status code to answer with."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass(frozen=True)
class ModelInfo:
    """What the HTTP layer knows about one served model version (from its input schema)."""

    name: str
    """Name in the URLs."""
    version: str
    """Registry version number, as a string."""
    ref: str
    """name:version in the registry."""
    task: str
    features: tuple[str, ...]
    categorical: frozenset[str]
    classes: tuple[Any, ...] | None

    @classmethod
    def from_schema(cls, name: str, ref: str, schema: dict[str, Any]) -> ModelInfo:
        """Build from a Predictor/Preprocessor `input_schema()`."""
        classes = schema.get("classes")
        return cls(
            name=name,
            version=ref.rsplit(":", 1)[1],
            ref=ref,
            task=str(schema["task"]),
            features=tuple(schema["features"]),
            categorical=frozenset(schema.get("categorical") or ()),
            classes=tuple(classes) if classes is not None else None,
        )

    @property
    def outputs(self) -> tuple[str, ...]:
        """Output tensor names."""
        return ("prediction", "probabilities") if self.task == "classification" else ("prediction",)

    @property
    def prediction_datatype(self) -> str:
        """OIP datatype of the `prediction` output."""
        if self.classes is None:
            return "FP64"
        if all(isinstance(c, bool) for c in self.classes):
            return "BOOL"
        if all(isinstance(c, str) for c in self.classes):
            return "BYTES"
        if all(isinstance(c, int) for c in self.classes):
            return "INT64"
        return "FP64"

    @cached_property
    def feature_set(self) -> frozenset[str]:
        """The features, for membership tests."""
        return frozenset(self.features)

    @cached_property
    def table_schema(self) -> pa.Schema:
        """The decoded table's schema: float64 numbers, string categories, in feature order."""
        return pa.schema(
            (f, pa.string() if f in self.categorical else pa.float64()) for f in self.features
        )

    def feature_list(self) -> str:
        """Features for an error message (shortened when there are many)."""
        names = list(self.features)
        if len(names) <= 8:
            return ", ".join(names)
        return f"{', '.join(names[:4])}, ..., {', '.join(names[-2:])} ({len(names)} features)"


@dataclass
class InferRequest:
    """A decoded OIP inference request."""

    table: pa.Table
    id: str | None = None
    outputs: list[tuple[str, bool]] = field(default_factory=list)
    """Requested outputs with whether each is returned as binary data."""


# ---- JSON ------------------------------------------------------------------------------------


def parse_json(body: bytes) -> Any:
    """Parse a JSON body. NaN/Infinity tokens parse to floats so validation can name where they
    are; malformed JSON is a 400."""
    try:
        return json.loads(body, parse_constant=float)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}") from None


def dumps(document: Any) -> bytes:
    """Compact JSON; refuses NaN/Infinity, which JSON cannot carry."""
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()


def error_body(message: str) -> dict[str, str]:
    """The protocol's error object."""
    return {"error": message}


# ---- model metadata --------------------------------------------------------------------------


def model_metadata(info: ModelInfo, versions: Sequence[str]) -> dict[str, Any]:
    """OIP model metadata: input and output tensor specs (-1: any size)."""
    if info.categorical:
        inputs = [
            {
                "name": f,
                "datatype": "BYTES" if f in info.categorical else "FP64",
                "shape": [-1],
            }
            for f in info.features
        ]
    else:
        inputs = [{"name": _MATRIX_INPUT, "datatype": "FP32", "shape": [-1, len(info.features)]}]
    outputs = [{"name": "prediction", "datatype": info.prediction_datatype, "shape": [-1]}]
    if info.classes is not None:
        outputs.append(
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(info.classes)]}
        )
    return {
        "name": info.name,
        "versions": list(versions),
        "platform": "kiln_pytorch",
        "inputs": inputs,
        "outputs": outputs,
    }


# ---- OIP inference request -------------------------------------------------------------------


def decode_infer_request(body: bytes, info: ModelInfo, header_length: int | None) -> InferRequest:
    """Decode an OIP inference request into a table of the model's features.

    Inputs are either one tensor per feature (named by feature, shape [n] or [n, 1]) or one
    tensor shaped [n, num_features] in feature order (any name). With `header_length` (Triton's
    binary extension), the body is that many bytes of JSON followed by the binary tensors.

    Raises:
        RequestError: malformed JSON, unknown key or input, wrong shape, datatype or element,
            NaN/Infinity, a missing feature.
    """
    binary = b""
    if header_length is not None:
        if not 0 <= header_length <= len(body):
            raise RequestError(
                400, f"Inference-Header-Content-Length {header_length} exceeds the body"
            )
        body, binary = body[:header_length], body[header_length:]
    request = parse_json(body)
    if not isinstance(request, dict):
        raise RequestError(400, "an inference request is a JSON object with 'inputs'")
    unknown = sorted(set(request) - _REQUEST_KEYS)
    if unknown:
        raise RequestError(400, f"unknown key {unknown[0]!r} in inference request")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(400, "'inputs' must be a non-empty list of tensors")
    tensors = _decode_tensors(inputs, binary)
    table = _table_from_tensors(tensors, info)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(400, "'id' must be a string")
    return InferRequest(table, request_id, _requested_outputs(request, info))


@dataclass
class _Tensor:
    name: str
    shape: list[int]
    datatype: str
    values: np.ndarray | list[Any]
    """Flat, row-major: a numpy array for numeric types, a list of str for BYTES."""


def _decode_tensors(inputs: list[Any], binary: bytes) -> list[_Tensor]:
    tensors: list[_Tensor] = []
    offset = 0
    for i, item in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(item, dict):
            raise RequestError(400, f"{where}: a tensor is a JSON object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(400, f"{where}: 'name' must be a non-empty string")
        where = f"input {name!r}"
        unknown = sorted(set(item) - _INPUT_KEYS)
        if unknown:
            raise RequestError(400, f"{where}: unknown key {unknown[0]!r}")
        shape, datatype = _shape(item.get("shape"), where), item.get("datatype")
        if datatype not in DATATYPES:
            raise RequestError(
                400, f"{where}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}"
            )
        count = math.prod(shape)
        size = _binary_size(item.get("parameters"), where)
        if size is not None:
            if offset + size > len(binary):
                raise RequestError(400, f"{where}: binary_data_size {size} runs past the body")
            values = _from_binary(binary[offset : offset + size], datatype, count, where)
            offset += size
        elif "data" in item:
            values = _from_json(item["data"], datatype, count, where)
        else:
            raise RequestError(400, f"{where}: 'data' is missing")
        tensors.append(_Tensor(name, shape, str(datatype), values))
    if offset != len(binary):
        raise RequestError(400, f"{len(binary) - offset} bytes of binary data belong to no input")
    return tensors


def _shape(shape: Any, where: str) -> list[int]:
    ok = isinstance(shape, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    )
    if not ok or not shape:
        raise RequestError(400, f"{where}: 'shape' must be a list of non-negative integers")
    return list(shape)


def _binary_size(parameters: Any, where: str) -> int | None:
    if parameters is None:
        return None
    if not isinstance(parameters, dict):
        raise RequestError(400, f"{where}: 'parameters' must be an object")
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RequestError(400, f"{where}: binary_data_size must be a non-negative integer")
    return size


def _flatten(data: Any, out: list[Any]) -> None:
    for item in data:
        if isinstance(item, list):
            _flatten(item, out)
        else:
            out.append(item)


def _from_json(data: Any, datatype: Any, count: int, where: str) -> np.ndarray | list[Any]:
    if not isinstance(data, list):
        raise RequestError(400, f"{where}: 'data' must be a list (row-major)")
    flat: list[Any] = []
    _flatten(data, flat)
    if len(flat) != count:
        raise RequestError(400, f"{where}: shape holds {count} elements but 'data' has {len(flat)}")
    check = _ELEMENT_CHECKS[datatype]
    for i, value in enumerate(flat):
        problem = check(value)
        if problem:
            raise RequestError(400, f"{where}: element {i} ({value!r:.40}) {problem}")
    if datatype == "BYTES":
        return flat
    dtype = _NUMPY_TYPES[datatype]
    try:
        return np.asarray(flat, dtype=np.float64 if dtype.kind == "f" else dtype)
    except OverflowError:
        raise RequestError(400, f"{where}: an element is out of range for {datatype}") from None


def _int_check(datatype: str) -> Callable[[Any], str | None]:
    dtype: Any = _NUMPY_TYPES[datatype]
    info = np.iinfo(dtype)

    def check(value: Any) -> str | None:
        if type(value) is not int:
            return f"is not an integer, as {datatype} needs"
        if not info.min <= value <= info.max:
            return f"is out of range for {datatype}"
        return None

    return check


def _float_check(value: Any) -> str | None:
    if type(value) not in (int, float):
        return "is not a number"
    if type(value) is float and not math.isfinite(value):
        return "is not finite; NaN and Infinity are not allowed"
    return None


_ELEMENT_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "BOOL": lambda v: None if type(v) is bool else "is not a boolean, as BOOL needs",
    "BYTES": lambda v: None if type(v) is str else "is not a string, as BYTES needs",
    "FP16": _float_check,
    "FP32": _float_check,
    "FP64": _float_check,
    **{t: _int_check(t) for t in _NUMPY_TYPES if t.startswith(("INT", "UINT"))},
}


def _from_binary(raw: bytes, datatype: Any, count: int, where: str) -> np.ndarray | list[Any]:
    if datatype == "BYTES":
        return _bytes_elements(raw, count, where)
    dtype = _NUMPY_TYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise RequestError(
            400,
            f"{where}: binary_data_size {len(raw)} does not fit {count} {datatype} elements "
            f"({count * dtype.itemsize} bytes)",
        )
    values = np.frombuffer(raw, dtype=dtype)
    if dtype.kind == "f":
        if not np.isfinite(values).all():
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            raise RequestError(
                400, f"{where}: element {bad} is not finite; NaN and Infinity are not allowed"
            )
        return values.astype(np.float64)
    return values


def _bytes_elements(raw: bytes, count: int, where: str) -> list[Any]:
    """Binary BYTES: each element a 4-byte little-endian length, then that many bytes."""
    out: list[Any] = []
    pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise RequestError(400, f"{where}: truncated BYTES element length")
        (length,) = struct.unpack_from("<I", raw, pos)
        chunk = raw[pos + 4 : pos + 4 + length]
        if len(chunk) != length:
            raise RequestError(400, f"{where}: truncated BYTES element {len(out)}")
        try:
            out.append(chunk.decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError(400, f"{where}: BYTES element {len(out)} is not UTF-8") from None
        pos += 4 + length
    if len(out) != count:
        raise RequestError(400, f"{where}: shape holds {count} elements but data has {len(out)}")
    return out


def _table_from_tensors(tensors: list[_Tensor], info: ModelInfo) -> pa.Table:
    names = [t.name for t in tensors]
    if len(tensors) == 1 and names[0] not in info.feature_set:
        return _table_from_matrix(tensors[0], info)
    seen: set[str] = set()
    columns: dict[str, pa.Array] = {}
    rows: int | None = None
    for tensor in tensors:
        where = f"input {tensor.name!r}"
        if tensor.name not in info.feature_set:
            raise RequestError(
                400,
                f"unknown input {tensor.name!r}; the model's features are {info.feature_list()}",
            )
        if tensor.name in seen:
            raise RequestError(400, f"{where} is given twice")
        seen.add(tensor.name)
        shape = tensor.shape
        if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
            raise RequestError(400, f"{where}: shape {shape} must be [n] or [n, 1]")
        if rows is not None and shape[0] != rows:
            raise RequestError(400, f"{where}: {shape[0]} rows, but other inputs have {rows}")
        rows = shape[0]
        columns[tensor.name] = _column(tensor, tensor.values, tensor.name in info.categorical)
    missing = [f for f in info.features if f not in seen]
    if missing:
        raise RequestError(
            400, f"missing input for feature {missing[0]!r} ({len(missing)} features missing)"
        )
    return _checked_table({f: columns[f] for f in info.features})


def _table_from_matrix(tensor: _Tensor, info: ModelInfo) -> pa.Table:
    where = f"input {tensor.name!r}"
    width = len(info.features)
    if len(tensor.shape) != 2 or tensor.shape[1] != width:
        raise RequestError(
            400,
            f"{where}: shape {tensor.shape} is neither [n, {width}] (all features in order) nor "
            f"a feature name; the model's features are {info.feature_list()}",
        )
    if info.categorical:
        raise RequestError(
            400,
            f"{where}: this model has categorical features ({', '.join(sorted(info.categorical))}"
            "); send one tensor per feature, named by feature",
        )
    if tensor.datatype == "BYTES":
        raise RequestError(400, f"{where}: numeric features need a numeric datatype, not BYTES")
    matrix = np.asarray(tensor.values, dtype=np.float64).reshape(tensor.shape)
    return _checked_table({f: pa.array(matrix[:, j]) for j, f in enumerate(info.features)})


def _column(tensor: _Tensor, values: np.ndarray | list[Any], categorical: bool) -> pa.Array:
    if categorical:
        if tensor.datatype == "BYTES":
            return pa.array(values, type=pa.string())
        if tensor.datatype == "BOOL":
            return pa.array(["true" if v else "false" for v in values], type=pa.string())
        if tensor.datatype.startswith(("INT", "UINT")):
            return pa.array([str(int(v)) for v in values], type=pa.string())
        raise RequestError(
            400,
            f"input {tensor.name!r}: categorical feature needs BYTES, INT or BOOL data, "
            f"not {tensor.datatype}",
        )
    if tensor.datatype == "BYTES":
        raise RequestError(
            400, f"input {tensor.name!r}: numeric feature needs a numeric datatype, not BYTES"
        )
    return pa.array(np.asarray(values, dtype=np.float64))


def _checked_table(columns: dict[str, pa.Array]) -> pa.Table:
    table = pa.table(columns)
    if table.num_rows == 0:
        raise RequestError(400, "the request has no rows to predict")
    return table


def _requested_outputs(request: dict[str, Any], info: ModelInfo) -> list[tuple[str, bool]]:
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError(400, "'parameters' must be an object")
    binary_default = parameters.get("binary_data_output") is True
    outputs = request.get("outputs")
    if outputs is None:
        return [(name, binary_default) for name in info.outputs]
    if not isinstance(outputs, list):
        raise RequestError(400, "'outputs' must be a list")
    chosen: list[tuple[str, bool]] = []
    for i, item in enumerate(outputs):
        name = item.get("name") if isinstance(item, dict) else None
        if name not in info.outputs:
            raise RequestError(
                400,
                f"outputs[{i}]: unknown output {name!r}; outputs are {', '.join(info.outputs)}",
            )
        params = item.get("parameters") or {}
        binary = params.get("binary_data", binary_default) if isinstance(params, dict) else False
        chosen.append((str(name), binary is True))
    return chosen


# ---- OIP inference response ------------------------------------------------------------------


def encode_infer_response(
    info: ModelInfo, result: dict[str, np.ndarray], request: InferRequest
) -> tuple[bytes, dict[str, str]]:
    """Encode predictions as an OIP response body; returns (body, extra headers).

    Outputs asked for as binary follow the JSON part (Triton's binary tensor extension), and the
    `Inference-Header-Content-Length` header says where the JSON ends.
    """
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in request.outputs:
        values = np.asarray(result[name])
        datatype = "FP32" if name == "probabilities" else info.prediction_datatype
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(values.shape)}
        if binary:
            blob = _to_binary(values, datatype)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = _to_json(values, datatype)
        outputs.append(tensor)
    document: dict[str, Any] = {"model_name": info.name, "model_version": info.version}
    if request.id is not None:
        document["id"] = request.id
    document["outputs"] = outputs
    header = dumps(document)
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


def _to_json(values: np.ndarray, datatype: str) -> list[Any]:
    flat = values.reshape(-1)
    if datatype == "BYTES":
        return [str(v) for v in flat.tolist()]
    if datatype == "FP32":
        flat = flat.astype(np.float32)
    return flat.tolist()


def _to_binary(values: np.ndarray, datatype: str) -> bytes:
    flat = values.reshape(-1)
    if datatype == "BYTES":
        parts = [str(v).encode() for v in flat.tolist()]
        return b"".join(struct.pack("<I", len(p)) + p for p in parts)
    return np.ascontiguousarray(flat, dtype=_NUMPY_TYPES[datatype]).tobytes()


# ---- the JSON :predict route -----------------------------------------------------------------


def decode_instances(body: bytes, info: ModelInfo) -> pa.Table:
    """Decode `{"instances": [{feature: value, ...}, ...]}` (or rows as lists in feature order)
    into a table of the model's features. `null` marks a missing value.

    Raises:
        RequestError: malformed JSON, an unknown or missing feature, a value of the wrong type,
            NaN/Infinity.
    """
    payload = parse_json(body)
    if not isinstance(payload, dict) or set(payload) != {"instances"}:
        raise RequestError(400, 'the body must be {"instances": [...]}, one object per row')
    instances = payload["instances"]
    if not isinstance(instances, list) or not instances:
        raise RequestError(400, "'instances' must be a non-empty list")
    rows = [_instance_values(row, i, info) for i, row in enumerate(instances)]
    for j, feature in enumerate(info.features):
        check = _check_category if feature in info.categorical else _check_number
        for i, row in enumerate(rows):
            problem = check(row[j])
            if problem:
                raise RequestError(400, f"instances[{i}].{feature}: {row[j]!r:.40} {problem}")
    numeric = [j for j, f in enumerate(info.features) if f not in info.categorical]
    # All numbers in one float64 block (null -> NaN -> null), one Arrow array sliced per column:
    # a request's few rows cost one conversion, not one per feature.
    block = np.array([[row[j] for j in numeric] for row in rows], dtype=np.float64)
    n = len(rows)
    flat = pa.array(np.ascontiguousarray(block.T).ravel(), from_pandas=True)
    columns: list[pa.Array] = []
    start = 0
    for j, feature in enumerate(info.features):
        if feature in info.categorical:
            columns.append(pa.array([_category(row[j]) for row in rows], type=pa.string()))
        else:
            columns.append(flat.slice(start, n))
            start += n
    return pa.Table.from_arrays(columns, schema=info.table_schema)


def _instance_values(row: Any, i: int, info: ModelInfo) -> list[Any]:
    if isinstance(row, list):
        if len(row) != len(info.features):
            raise RequestError(
                400,
                f"instances[{i}]: a row given as a list needs {len(info.features)} values in "
                f"feature order, got {len(row)}",
            )
        return row
    if not isinstance(row, dict):
        raise RequestError(400, f"instances[{i}]: expected an object of feature values")
    unknown = [key for key in row if key not in info.feature_set]
    if unknown:
        raise RequestError(
            400,
            f"instances[{i}]: unknown feature {unknown[0]!r}; the model's features are "
            f"{info.feature_list()}",
        )
    missing = [f for f in info.features if f not in row]
    if missing:
        raise RequestError(
            400,
            f"instances[{i}]: missing feature {missing[0]!r} (send null for a missing value)",
        )
    return [row[f] for f in info.features]


def _check_number(value: Any) -> str | None:
    if value is None:
        return None
    if type(value) not in (int, float, bool):
        return "is not a number"
    if type(value) is float and not math.isfinite(value):
        return "is not allowed (send null for a missing value)"
    if type(value) is int and abs(value) > 1e308:
        return "is too large"
    return None


def _check_category(value: Any) -> str | None:
    if value is None or type(value) in (str, int, bool):
        return None
    return "is not a category (a string, integer or boolean)"


def _category(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def encode_predictions(info: ModelInfo, result: dict[str, np.ndarray]) -> dict[str, Any]:
    """The `:predict` response: one entry per row, a label with per-class probabilities for a
    classifier, a value for a regressor."""
    predictions: list[dict[str, Any]]
    values = np.asarray(result["prediction"]).tolist()
    if info.classes is None:
        predictions = [{"value": v} for v in values]
    else:
        keys = [str(c) for c in info.classes]
        probabilities = np.asarray(result["probabilities"], dtype=np.float32).tolist()
        predictions = [
            {"label": label, "probabilities": dict(zip(keys, row, strict=True))}
            for label, row in zip(values, probabilities, strict=True)
        ]
    return {"model_name": info.name, "model_version": info.version, "predictions": predictions}


# ---- transport -------------------------------------------------------------------------------


def decode_content(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo a gzip or deflate Content-Encoding without ever holding more than `limit` bytes.

    Raises:
        RequestError: 415 for another encoding, 413 when the decoded body exceeds `limit`, 400
            when the compressed data is corrupt.
    """
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise RequestError(415, f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise RequestError(400, f"the {encoding} body cannot be decoded: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise RequestError(413, f"the decoded request body exceeds {limit} bytes")
    return data


# ---- shapes for the OpenAPI document ---------------------------------------------------------


class TensorDoc(BaseModel):
    """One tensor of the Open Inference Protocol."""

    name: str
    shape: list[int]
    datatype: str = Field(description=f"one of {', '.join(DATATYPES)}")
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(default=None, description="elements in row-major order")


class InferRequestDoc(BaseModel):
    """An OIP inference request: one tensor per feature ([n] or [n, 1]) or one [n, features]
    tensor in feature order."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[TensorDoc]
    outputs: list[dict[str, Any]] | None = None


class InferResponseDoc(BaseModel):
    """An OIP inference response: `prediction`, and `probabilities` [n, classes] for a
    classifier."""

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[TensorDoc]


class ModelMetadataDoc(BaseModel):
    """OIP model metadata."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]


class PredictRequestDoc(BaseModel):
    """Rows to score: objects keyed by feature (null for a missing value), or lists of values in
    feature order."""

    instances: list[dict[str, Any] | list[Any]]


class PredictResponseDoc(BaseModel):
    """One prediction per row: `label` and per-class `probabilities` for a classifier, `value`
    for a regressor."""

    model_name: str
    model_version: str
    predictions: list[dict[str, Any]]


class ErrorDoc(BaseModel):
    """An error, as the Open Inference Protocol defines it."""

    error: str
