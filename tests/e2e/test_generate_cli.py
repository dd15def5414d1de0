"""`kiln score --task generate` as a user types it: prompts Parquet in, completions Parquet out,
the same greedy text as the predictor called directly."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln.inference.lm import GenerationRequest, LMPredictor
from tests.e2e.test_score_cli import _one_error_line, kiln
from tests.integration.test_lm_serve import PROMPTS, register_lm

pytestmark = pytest.mark.e2e


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A folder with prompts.parquet and a tiny language model in .kiln/registry."""
    register_lm(tmp_path / ".kiln" / "registry")
    pq.write_table(pa.table({"prompt": PROMPTS}), tmp_path / "prompts.parquet")
    return tmp_path


def test_generate_writes_one_completion_per_prompt(project: Path) -> None:
    result = kiln(
        "score",
        "tiny-lm",
        "--input",
        "prompts.parquet",
        "--output",
        "out/gen",
        "--task",
        "generate",
        "--max-tokens",
        "8",
        "--stop",
        "\n",
        cwd=project,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generated completions for 3 of 3 prompts (0 quarantined)" in result.stdout
    table = pq.read_table(project / "out" / "gen").sort_by("key")
    assert table["key"].to_pylist() == [f"prompts.parquet:{row}" for row in range(3)]
    predictor = LMPredictor(str(project / ".kiln" / "registry"), "tiny-lm:1")
    expected = [
        predictor.complete(GenerationRequest(p, max_tokens=8, temperature=0.0, stop=["\n"]))
        for p in PROMPTS
    ]
    assert table["prompt"].to_pylist() == PROMPTS
    assert table["completion"].to_pylist() == [e.text for e in expected]
    assert table["finish_reason"].to_pylist() == [e.finish_reason for e in expected]
    success = json.loads((project / "out" / "gen" / "_SUCCESS").read_text())
    assert success["task"] == "generate" and success["model"] == "tiny-lm:1"
    assert success["generation"]["max_tokens"] == 8 and success["generation"]["stop"] == ["\n"]


def test_a_language_model_does_not_predict(project: Path) -> None:
    result = kiln(
        "score", "tiny-lm", "--input", "prompts.parquet", "--output", "out/x", cwd=project
    )
    assert "tiny-lm:1 is a language model: generate with it" in _one_error_line(result)
    assert not (project / "out" / "x").exists()
