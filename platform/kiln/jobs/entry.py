"""Turning a job spec into the command line of the kiln command that runs it on the cluster."""

from __future__ import annotations

from kiln.config import load_spec
from kiln.config.spec import GenerationSpec
from kiln.errors import KilnError


def score_argv(spec_path: str, overrides: list[str] | tuple[str, ...] = ()) -> list[str]:
    """`kiln score ...` arguments for the spec's `score` section.

    Raises:
        KilnError: a bad spec, or one without a `score` section.
    """
    spec = load_spec(spec_path, list(overrides))
    score = spec.score
    if score is None:
        raise KilnError(f"{spec_path}: no `score` section (model, input, output) to run")
    low, high = score.concurrency
    argv = [
        "score",
        score.model or f"{spec.name}@production",
        "--input",
        score.input,
        "--output",
        score.output,
        "--format",
        score.format,
        "--batch-size",
        str(score.batch_size),
        "--concurrency",
        f"{low}:{high}",
        "--on-error",
        score.on_error,
        "--cpus-per-worker",
        str(score.cpus_per_worker),
        "--registry",
        spec.registry,
    ]
    if score.task == "generate":
        argv += _generation_argv(score.generation or GenerationSpec())
    if score.key:
        argv += ["--key", score.key]
    if score.overwrite:
        argv.append("--overwrite")
    if not spec.tracking.enabled:
        argv.append("--no-tracking")
    elif spec.tracking.uri:
        argv += ["--tracking-uri", spec.tracking.uri]
    return argv


def _generation_argv(generation: GenerationSpec) -> list[str]:
    """`kiln score --task generate` flags for the spec's `score.generation`."""
    argv = [
        "--task",
        "generate",
        "--prompt-column",
        generation.prompt_column,
        "--max-tokens",
        str(generation.max_tokens),
        "--temperature",
        str(generation.temperature),
    ]
    optional = {"--top-p": generation.top_p, "--top-k": generation.top_k, "--seed": generation.seed}
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, str(value)]
    # --stop=TEXT: a stop string that starts with "-" must not read as a flag.
    argv += [f"--stop={stop}" for stop in generation.stop]
    return argv
