"""Batch-generation options without Ray: the checks on `kiln score --task generate` flags, and
the job spec's `score.task: generate` section turned into those flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.cli.main import main
from kiln.config import validate_spec
from kiln.errors import KilnError, SpecError
from kiln.inference.batch import GenerateOptions, _check_task
from kiln.jobs.entry import score_argv

BASE = {"name": "tiny-gpt", "data": {"train": "d", "validation_split": 0.2, "label": "y"}}


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        (GenerateOptions(max_tokens=0), "--max-tokens must be at least 1, got 0"),
        (GenerateOptions(temperature=-1.0), "--temperature must be >= 0"),
        (GenerateOptions(top_p=1.5), r"--top-p must be in \(0, 1\]"),
        (GenerateOptions(top_k=0), "--top-k must be >= 1"),
        (GenerateOptions(stop=("",)), "--stop: a stop sequence must not be empty"),
        (GenerateOptions(prompt_column=""), "--prompt-column must name a column"),
    ],
)
def test_bad_generation_options_name_the_flag(options: GenerateOptions, flag: str) -> None:
    with pytest.raises(KilnError, match=flag):
        _check_task("generate", options)


def test_task_and_options_go_together() -> None:
    assert _check_task("predict", None) is None
    assert _check_task("generate", None) == GenerateOptions()
    with pytest.raises(KilnError, match="--task must be one of"):
        _check_task("embed", None)
    with pytest.raises(KilnError, match="need --task generate"):
        _check_task("predict", GenerateOptions(max_tokens=4))
    request = GenerateOptions(max_tokens=4, stop=("\n",), seed=1).request("def ")
    assert (request.prompt, request.max_tokens, request.temperature) == ("def ", 4, 0.0)
    assert (request.stop, request.seed) == (["\n"], 1)


def test_generation_flags_without_the_task_are_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["score", "m", "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    assert main([*argv, "--max-tokens", "5", "--registry", str(tmp_path)]) == 2
    assert "need --task generate" in capsys.readouterr().err


def test_the_job_spec_score_section_can_generate(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"score\.generation applies to score\.task: generate"):
        validate_spec({**BASE, "score": {"input": "i", "output": "o", "generation": {}}})
    with pytest.raises(SpecError, match=r"score\.generation\.max_tokens"):
        validate_spec(
            {
                **BASE,
                "score": {
                    "input": "i",
                    "output": "o",
                    "task": "generate",
                    "generation": {"max_tokens": 0},
                },
            }
        )
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: tiny-gpt\ndata: {train: d, validation_split: 0.2, label: y}\nregistry: /r\n"
        "score: {input: p.parquet, output: out, task: generate,\n"
        '        generation: {max_tokens: 32, stop: ["\\n\\n", "-x"], seed: 3}}\n'
    )
    argv = score_argv(str(spec))
    assert argv[:2] == ["score", "tiny-gpt@production"]
    text = " ".join(argv)
    assert "--task generate --prompt-column prompt --max-tokens 32 --temperature 0.0" in text
    assert "--seed 3" in text and "--top-p" not in text
    assert argv[-2:] == ["--stop=\n\n", "--stop=-x"]
    plain = score_argv(str(spec), ["score.task=predict", "score.generation=null"])
    assert "--task" not in plain
