"""Online-serving protocol rules without Ray: Open Inference Protocol v2 decoding and encoding
(JSON and binary tensors), the JSON :predict route, validation messages, and the serve spec."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from kiln.errors import SpecError
from kiln.inference import oip
from kiln.inference.oip import ModelInfo, RequestError
from kiln.inference.serve_spec import load_serve_spec, load_token, validate_serve_spec

REPO = Path(__file__).resolve().parents[2]
FEATURES = [f"px_{i:02d}" for i in range(64)]


def digits_info() -> ModelInfo:
    schema = {
        "task": "classification",
        "features": FEATURES,
        "categorical": [],
        "classes": [*range(10)],
    }
    return ModelInfo.from_schema("digits", "digits-mlp:3", schema)


def mixed_info() -> ModelInfo:
    schema = {
        "task": "classification",
        "features": ["age", "city"],
        "categorical": ["city"],
        "classes": ["no", "yes"],
    }
    return ModelInfo.from_schema("churn", "churn:1", schema)


def regression_info() -> ModelInfo:
    schema = {"task": "regression", "features": ["x"], "categorical": [], "classes": None}
    return ModelInfo.from_schema("price", "price:2", schema)


def body(document: Any) -> bytes:
    return json.dumps(document).encode()


def rejects(fn: Any, *args: Any, status: int = 400, match: str) -> RequestError:
    with pytest.raises(RequestError, match=match) as info:
        fn(*args)
    assert info.value.status == status
    return info.value


def matrix_request(rows: list[list[Any]], **extra: Any) -> dict[str, Any]:
    tensor = {"name": "input", "shape": [len(rows), len(rows[0])], "datatype": "FP32", "data": rows}
    return {"inputs": [tensor], **extra}


ROWS = [[float(i % 17) for i in range(64)], [float((i * 7) % 16) for i in range(64)]]


# ---- OIP requests ------------------------------------------------------------------------------


def test_matrix_input_nested_or_flat_gives_the_same_table() -> None:
    info = digits_info()
    nested = oip.decode_infer_request(body(matrix_request(ROWS)), info, None)
    flat_request = matrix_request(ROWS)
    flat_request["inputs"][0]["data"] = [v for row in ROWS for v in row]
    flat = oip.decode_infer_request(body(flat_request), info, None)
    assert nested.table.equals(flat.table)
    assert nested.table.column_names == FEATURES
    assert nested.table.column("px_05").to_pylist() == [ROWS[0][5], ROWS[1][5]]
    assert nested.outputs == [("prediction", False), ("probabilities", False)]


def test_one_tensor_per_feature_matches_the_matrix() -> None:
    info = digits_info()
    per_feature = {
        "inputs": [
            {"name": f, "shape": [2, 1] if j % 2 else [2], "datatype": "FP64", "data": [a, b]}
            for j, (f, a, b) in enumerate(zip(FEATURES, ROWS[0], ROWS[1], strict=True))
        ]
    }
    decoded = oip.decode_infer_request(body(per_feature), info, None)
    assert decoded.table.equals(
        oip.decode_infer_request(body(matrix_request(ROWS)), info, None).table
    )


def test_categorical_features_take_bytes_or_integers() -> None:
    request = {
        "id": "r1",
        "inputs": [
            {"name": "city", "shape": [2], "datatype": "BYTES", "data": ["Oslo", "Lima"]},
            {"name": "age", "shape": [2], "datatype": "INT32", "data": [31, 45]},
        ],
    }
    decoded = oip.decode_infer_request(body(request), mixed_info(), None)
    assert decoded.id == "r1"
    assert decoded.table.column_names == ["age", "city"]
    assert decoded.table.column("age").to_pylist() == [31.0, 45.0]
    assert decoded.table.column("city").to_pylist() == ["Oslo", "Lima"]
    request["inputs"][0] = {"name": "city", "shape": [2], "datatype": "INT64", "data": [3, 4]}
    assert oip.decode_infer_request(body(request), mixed_info(), None).table.column(
        "city"
    ).to_pylist() == ["3", "4"]


@pytest.mark.parametrize(
    ("request_doc", "message"),
    [
        ({"inputs": []}, "'inputs' must be a non-empty list"),
        ({"inputs": [{"name": "input"}], "input": 1}, "unknown key 'input'"),
        (matrix_request([[1.0] * 63]), r"shape \[1, 63\] is neither \[n, 64\]"),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [2, 64], "datatype": "FP32", "data": [1.0] * 127}
                ]
            },
            "shape holds 128 elements but 'data' has 127",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, 64], "datatype": "FLOAT", "data": [1] * 64}
                ]
            },
            "datatype 'FLOAT' is not one of",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, 64], "datatype": "INT32", "data": [1.5] * 64}
                ]
            },
            r"element 0 \(1.5\) is not an integer, as INT32 needs",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ["a"] * 64}
                ]
            },
            r"element 0 \('a'\) is not a number",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, 64], "datatype": "INT8", "data": [300] * 64}
                ]
            },
            "out of range for INT8",
        ),
        (
            {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": None}]},
            "'data' must be a list",
        ),
        (
            {"inputs": [{"name": "input", "shape": [-1, 64], "datatype": "FP32", "data": []}]},
            "'shape' must be a list of non-negative integers",
        ),
        (
            {"inputs": [{"name": "input", "shape": [0, 64], "datatype": "FP32", "data": []}]},
            "no rows to predict",
        ),
        (
            {
                "inputs": [
                    {"name": "px_00", "shape": [1], "datatype": "FP32", "data": [1.0]},
                    {"name": "pixel", "shape": [1], "datatype": "FP32", "data": [1.0]},
                ]
            },
            r"unknown input 'pixel'; the model's features are px_00, px_01, px_02, px_03, ..., "
            r"px_62, px_63 \(64 features\)",
        ),
        (
            {"inputs": [{"name": "px_00", "shape": [1], "datatype": "FP32", "data": [1.0]}] * 2},
            "input 'px_00' is given twice",
        ),
        (
            {
                "inputs": [
                    {"name": "px_00", "shape": [1], "datatype": "FP32", "data": [1.0]},
                    {"name": "px_01", "shape": [1], "datatype": "FP32", "data": [1.0]},
                ]
            },
            r"missing input for feature 'px_02' \(62 features missing\)",
        ),
        (
            {
                "inputs": [
                    {"name": "px_00", "shape": [1], "datatype": "FP32", "data": [1.0]},
                    {"name": "px_01", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]},
                ]
            },
            "input 'px_01': 2 rows, but other inputs have 1",
        ),
        (
            {"inputs": [{"name": "px_00", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]},
            r"shape \[1, 2\] must be \[n\] or \[n, 1\]",
        ),
        (
            {**matrix_request(ROWS), "outputs": [{"name": "logits"}]},
            "outputs\\[0\\]: unknown output 'logits'; outputs are prediction, probabilities",
        ),
    ],
)
def test_bad_inference_requests_name_the_problem(request_doc: dict, message: str) -> None:
    rejects(oip.decode_infer_request, body(request_doc), digits_info(), None, match=message)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_tensor_data_is_refused(token: str) -> None:
    data = ", ".join(["1.0"] * 63 + [token])
    tensor = f'{{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [{data}]}}'
    raw = f'{{"inputs": [{tensor}]}}'
    rejects(
        oip.decode_infer_request,
        raw.encode(),
        digits_info(),
        None,
        match="element 63 .* is not finite; NaN and Infinity are not allowed",
    )


def test_malformed_json_is_a_400() -> None:
    rejects(oip.decode_infer_request, b'{"inputs": [', digits_info(), None, match="not valid JSON")
    rejects(oip.decode_infer_request, b"[1, 2]", digits_info(), None, match="JSON object")


def test_categorical_model_refuses_a_matrix_and_bytes_for_numbers() -> None:
    info = mixed_info()
    matrix = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
    rejects(oip.decode_infer_request, body(matrix), info, None, match="categorical features")
    request = {
        "inputs": [
            {"name": "city", "shape": [1], "datatype": "FP32", "data": [1.0]},
            {"name": "age", "shape": [1], "datatype": "FP32", "data": [3.0]},
        ]
    }
    rejects(oip.decode_infer_request, body(request), info, None, match="needs BYTES, INT or BOOL")
    request["inputs"][0] = {"name": "city", "shape": [1], "datatype": "BYTES", "data": ["x"]}
    request["inputs"][1] = {"name": "age", "shape": [1], "datatype": "BYTES", "data": ["3"]}
    rejects(
        oip.decode_infer_request, body(request), info, None, match="numeric datatype, not BYTES"
    )


# ---- binary tensor extension -------------------------------------------------------------------


def binary_request(header: dict[str, Any], *blobs: bytes) -> tuple[bytes, int]:
    head = body(header)
    return head + b"".join(blobs), len(head)


def test_binary_inputs_decode_like_json() -> None:
    info = digits_info()
    blob = np.asarray(ROWS, dtype="<f4").tobytes()
    tensor = {"name": "input", "shape": [2, 64], "datatype": "FP32"}
    tensor["parameters"] = {"binary_data_size": len(blob)}
    raw, length = binary_request({"inputs": [tensor]}, blob)
    decoded = oip.decode_infer_request(raw, info, length)
    assert decoded.table.equals(
        oip.decode_infer_request(body(matrix_request(ROWS)), info, None).table
    )


def test_binary_bytes_and_errors() -> None:
    info = mixed_info()
    cities = b"".join(struct.pack("<I", len(s)) + s for s in (b"Oslo", b"Lima"))
    ages = np.asarray([31, 45], dtype="<i8").tobytes()
    header = {
        "inputs": [
            {
                "name": "city",
                "shape": [2],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(cities)},
            },
            {
                "name": "age",
                "shape": [2],
                "datatype": "INT64",
                "parameters": {"binary_data_size": len(ages)},
            },
        ]
    }
    raw, length = binary_request(header, cities, ages)
    table = oip.decode_infer_request(raw, info, length).table
    assert table.column("city").to_pylist() == ["Oslo", "Lima"]
    assert table.column("age").to_pylist() == [31.0, 45.0]
    rejects(oip.decode_infer_request, raw + b"xx", info, length, match="2 bytes of binary data")
    rejects(oip.decode_infer_request, raw, info, len(raw) + 1, match="exceeds the body")
    nan = np.asarray([1.0, np.nan], dtype="<f8").tobytes()
    header["inputs"][1] = {
        "name": "age",
        "shape": [2],
        "datatype": "FP64",
        "parameters": {"binary_data_size": 16},
    }
    raw, length = binary_request(header, cities, nan)
    rejects(oip.decode_infer_request, raw, info, length, match="element 1 is not finite")


def test_binary_outputs_follow_the_json_header() -> None:
    info = digits_info()
    request = oip.decode_infer_request(
        body(matrix_request(ROWS, parameters={"binary_data_output": True})), info, None
    )
    probabilities = np.asarray([[0.25] * 4 + [0.0] * 6, [0.1] * 10], dtype=np.float32)
    result = {"prediction": np.asarray([3, 7]), "probabilities": probabilities}
    content, headers = oip.encode_infer_response(info, result, request)
    assert headers["content-type"] == "application/octet-stream"
    length = int(headers[oip.HEADER_LENGTH])
    document = json.loads(content[:length])
    sizes = [o["parameters"]["binary_data_size"] for o in document["outputs"]]
    assert sizes == [16, 80]
    blob = content[length:]
    assert np.frombuffer(blob[:16], "<i8").tolist() == [3, 7]
    assert np.array_equal(np.frombuffer(blob[16:], "<f4").reshape(2, 10), probabilities)


# ---- OIP responses and metadata ----------------------------------------------------------------


def test_json_response_has_tensors_in_row_major_order() -> None:
    info = digits_info()
    request = oip.decode_infer_request(
        body(matrix_request(ROWS, id="abc", outputs=[{"name": "probabilities"}])), info, None
    )
    probabilities = np.random.default_rng(0).random((2, 10), dtype=np.float32)
    result = {"prediction": np.asarray([3, 7]), "probabilities": probabilities}
    content, headers = oip.encode_infer_response(info, result, request)
    assert headers == {"content-type": "application/json"}
    document = json.loads(content)
    assert document["model_name"] == "digits"
    assert document["model_version"] == "3"
    assert document["id"] == "abc"
    [tensor] = document["outputs"]
    assert tensor["name"] == "probabilities"
    assert tensor["datatype"] == "FP32"
    assert tensor["shape"] == [2, 10]
    assert np.array_equal(
        np.asarray(tensor["data"], dtype=np.float32).reshape(2, 10), probabilities
    )


def test_prediction_datatype_follows_the_classes() -> None:
    assert digits_info().prediction_datatype == "INT64"
    assert mixed_info().prediction_datatype == "BYTES"
    assert regression_info().prediction_datatype == "FP64"
    assert regression_info().outputs == ("prediction",)


def test_metadata_describes_input_and_output_tensors() -> None:
    document = oip.model_metadata(digits_info(), ["3", "2"])
    assert document["name"] == "digits"
    assert document["versions"] == ["3", "2"]
    assert document["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert document["outputs"] == [
        {"name": "prediction", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
    ]
    mixed = oip.model_metadata(mixed_info(), ["1"])
    assert mixed["inputs"] == [
        {"name": "age", "datatype": "FP64", "shape": [-1]},
        {"name": "city", "datatype": "BYTES", "shape": [-1]},
    ]


# ---- the JSON :predict route -------------------------------------------------------------------


def instances(*rows: dict[str, Any]) -> bytes:
    return body({"instances": list(rows)})


def digit_row(value: Any = 1.0, **changes: Any) -> dict[str, Any]:
    return {**dict.fromkeys(FEATURES, value), **changes}


def test_instances_become_a_feature_table() -> None:
    table = oip.decode_instances(instances(digit_row(2.0), digit_row(px_03=None)), digits_info())
    assert table.column_names == FEATURES
    assert table.column("px_00").to_pylist() == [2.0, 1.0]
    assert table.column("px_03").to_pylist() == [2.0, None]
    as_lists = body({"instances": [[2.0] * 64]})
    assert oip.decode_instances(as_lists, digits_info()).column("px_63").to_pylist() == [2.0]


def test_instances_categorical_values_are_strings() -> None:
    table = oip.decode_instances(
        instances({"age": 3, "city": "Oslo"}, {"age": 4, "city": 7}, {"age": 5, "city": True}),
        mixed_info(),
    )
    assert table.column("city").to_pylist() == ["Oslo", "7", "true"]
    assert table.schema.field("age").type == pa.float64()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{", "not valid JSON"),
        (body({"rows": []}), r'the body must be \{"instances": \[...\]\}'),
        (body({"instances": []}), "non-empty list"),
        (
            instances(digit_row(), {**digit_row(), "px_64": 1}),
            r"instances\[1\]: unknown feature 'px_64'",
        ),
        (instances({"px_00": 1.0}), r"instances\[0\]: missing feature 'px_01' \(send null"),
        (instances(digit_row(px_07="dark")), r"instances\[0\].px_07: 'dark' is not a number"),
        (body({"instances": [[1.0] * 3]}), "needs 64 values in feature order, got 3"),
        (body({"instances": ["x"]}), r"instances\[0\]: expected an object"),
    ],
)
def test_bad_instances_name_the_problem(raw: bytes, message: str) -> None:
    rejects(oip.decode_instances, raw, digits_info(), match=message)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_instances_are_refused(token: str) -> None:
    raw = json.dumps({"instances": [digit_row(px_09=0.5)]}).replace("0.5", token).encode()
    rejects(
        oip.decode_instances, raw, digits_info(), match=r"instances\[0\].px_09: .* is not allowed"
    )


def test_predictions_carry_labels_probabilities_and_version() -> None:
    result = {
        "prediction": np.asarray(["yes", "no"]),
        "probabilities": np.asarray([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32),
    }
    document = oip.encode_predictions(mixed_info(), result)
    assert document == {
        "model_name": "churn",
        "model_version": "1",
        "predictions": [
            {"label": "yes", "probabilities": {"no": 0.25, "yes": 0.75}},
            {"label": "no", "probabilities": {"no": 0.5, "yes": 0.5}},
        ],
    }
    value = oip.encode_predictions(regression_info(), {"prediction": np.asarray([1.5])})
    assert value["predictions"] == [{"value": 1.5}]
    assert value["model_version"] == "2"


# ---- transport ---------------------------------------------------------------------------------


def test_content_encoding() -> None:
    data = b"x" * 5000
    assert oip.decode_content(gzip.compress(data), "gzip", 10_000) == data
    assert oip.decode_content(data, None, 10_000) == data
    rejects(oip.decode_content, gzip.compress(data), "gzip", 4000, status=413, match="exceeds 4000")
    rejects(oip.decode_content, data, "br", 10_000, status=415, match="'br' is not supported")
    rejects(oip.decode_content, b"junk", "gzip", 10_000, match="cannot be decoded")


# ---- the serve spec ----------------------------------------------------------------------------


def test_example_serve_spec_is_valid() -> None:
    spec = load_serve_spec(REPO / "jobs" / "configs" / "digits-serve.yaml")
    [model] = spec.models
    assert model.served_name == "digits"
    assert [(v.ref, v.weight) for v in model.variants] == [
        ("digits-mlp@production", 90),
        ("digits-mlp@canary", 10),
    ]
    assert spec.auth.token_env == "KILN_API_TOKEN"


def test_serve_spec_errors_name_the_dotted_field() -> None:
    raw = {
        "models": [
            {"ref": "a:1", "versions": [{"ref": "a:2"}]},
            {"versions": [{"ref": "a:1"}, {"ref": "b:2"}]},
            {"ref": "c", "batching": {"max_batch_size": 64}, "max_ongoing_requests": 8},
            {"ref": "d", "autoscaling": {"look_back_period_s": 2}},
        ],
        "auth": {"token_env": "T", "token_file": "/x"},
        "limits": {"max_body_byte": 1},
    }
    with pytest.raises(SpecError) as info:
        validate_serve_spec(raw)
    message = str(info.value)
    assert "models.0: give either ref (one version) or versions" in message
    assert "models.1: versions: every ref must name the same registered model" in message
    assert "models.2: max_ongoing_requests (8) must be >= batching.max_batch_size (64)" in message
    assert (
        "models.3.autoscaling: look_back_period_s (2.0) must exceed metrics_interval_s" in message
    )
    assert "auth: give auth.token_env or auth.token_file, not both" in message
    assert "limits.max_body_byte: unknown key" in message


def test_served_names_must_be_unique_and_default_to_the_model() -> None:
    spec = validate_serve_spec({"models": [{"ref": "digits-mlp@production"}]})
    assert spec.models[0].served_name == "digits-mlp"
    with pytest.raises(SpecError, match="served name 'digits-mlp' appears twice"):
        validate_serve_spec({"models": [{"ref": "digits-mlp:1"}, {"ref": "digits-mlp:2"}]})


def test_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    auth = validate_serve_spec({"models": [{"ref": "m"}], "auth": {"token_env": "KT"}}).auth
    monkeypatch.delenv("KT", raising=False)
    with pytest.raises(SpecError, match=r"auth.token_env: \$KT is not set"):
        load_token(auth)
    monkeypatch.setenv("KT", "t0ken")
    assert load_token(auth) == "t0ken"
    path = tmp_path / "token"
    path.write_text("from-file\n")
    auth = validate_serve_spec({"models": [{"ref": "m"}], "auth": {"token_file": str(path)}}).auth
    assert load_token(auth) == "from-file"
    path.write_text("")
    with pytest.raises(SpecError, match="is empty"):
        load_token(auth)
    assert load_token(validate_serve_spec({"models": [{"ref": "m"}]}).auth) is None


def test_overrides_reach_into_lists() -> None:
    example = REPO / "jobs" / "configs" / "digits-serve.yaml"
    spec = load_serve_spec(
        example, ["models.0.autoscaling.max_replicas=4", "models.0.versions.1.weight=20"]
    )
    assert spec.models[0].autoscaling.max_replicas == 4
    assert spec.models[0].variants[1].weight == 20
    with pytest.raises(SpecError, match="models.3 is not an index of that list"):
        load_serve_spec(example, ["models.3.ref=x"])
    with pytest.raises(SpecError, match="name.x is a value, not a section"):
        load_serve_spec(example, ["name.x=1"])
    with pytest.raises(SpecError, match="models.0.batching.max_batch: unknown key"):
        load_serve_spec(example, ["models.0.batching.max_batch=3"])
