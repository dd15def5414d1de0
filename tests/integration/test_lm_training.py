"""Language modeling on a local Ray: byte-level tokens packed in Ray Data, a causal_lm trained
with DeepSpeed on 2 workers, perplexity against the unigram baseline, and the registered model
generating through the predictor."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln.config import JobSpec, validate_spec
from kiln.inference.lm import GenerationRequest, LMPredictor
from kiln.train.run import run

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

MODULES = ["textwrap", "string", "glob", "fnmatch", "shlex", "bisect", "heapq", "colorsys"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few standard-library modules, one document per function-sized chunk, 2 shards."""
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for name in MODULES:
        source = (root / f"{name}.py").read_text(encoding="utf-8")
        documents += [chunk for chunk in source.split("\n\n\n") if chunk.strip()]
    out = tmp_path_factory.mktemp("corpus")
    half = len(documents) // 2
    for index, part in enumerate((documents[:half], documents[half:])):
        pq.write_table(pa.table({"text": part}), out / f"part-{index}.parquet")
    return out


def lm_spec(corpus: Path, tmp_path: Path, **train: Any) -> JobSpec:
    deepspeed = train.pop("deepspeed", {})
    return validate_spec(
        {
            "name": "tiny-lm",
            "data": {
                "train": str(corpus),
                "validation_split": 0.1,
                "task": "language_modeling",
                "block_size": 64,
            },
            "model": {"kind": "causal_lm", "n_layers": 2, "n_heads": 2, "d_model": 64},
            "train": {
                "epochs": 5,
                "batch_size": 16,
                "lr": 0.006,
                "warmup_steps": 10,
                "num_workers": 2,
                "storage": str(tmp_path / "runs"),
                "log_every": 1000,
                "sample_prompt": "def ",
                "sample_tokens": 24,
                "deepspeed": {"zero_stage": 2, **deepspeed},
                **train,
            },
            "registry": str(tmp_path / "registry"),
        }
    )


def test_trains_below_the_unigram_baseline_and_generates(corpus: Path, tmp_path: Path) -> None:
    spec = lm_spec(corpus, tmp_path)
    outcome = run(spec)

    assert [epoch["epoch"] for epoch in outcome.history] == [1, 2, 3, 4, 5]
    last = outcome.history[-1]
    assert last["tokens_per_s"] > 0
    assert isinstance(last["sample"], str)
    # Byte-level text: a unigram model is ~20-30 perplexity; five short epochs of a tiny
    # transformer learn enough structure to be clearly below it.
    assert last["val_perplexity"] < 0.8 * last["val_unigram_perplexity"], last
    assert outcome.history[-1]["val_loss"] < outcome.history[0]["val_loss"]

    predictor = LMPredictor(spec.registry, outcome.model.ref)
    request = GenerationRequest(prompt="def ", max_tokens=20, temperature=0.0)
    first, second = predictor.complete(request), predictor.complete(request)
    assert first == second
    assert first.prompt_tokens == 1 + len(b"def ")
    streamed = [piece for piece in predictor.stream(request) if isinstance(piece, str)]
    assert "".join(streamed) == first.text


def test_zero3_with_max_steps_ends_inside_the_first_epoch(corpus: Path, tmp_path: Path) -> None:
    spec = lm_spec(corpus, tmp_path, max_steps=3, deepspeed={"zero_stage": 3})
    outcome = run(spec)

    assert [epoch["step"] for epoch in outcome.history] == [3]
    # Under ZeRO-3 both ranks generate the per-epoch sample in lock-step.
    assert isinstance(outcome.history[0]["sample"], str)
    assert LMPredictor(spec.registry, outcome.model.ref).context_length == 64


def test_fine_tunes_a_local_hugging_face_checkpoint(corpus: Path, tmp_path: Path) -> None:
    """hf_causal_lm from a `save_pretrained` directory with its own tokenizer.json: trains,
    registers, and the registered model generates after the directory is gone."""
    import shutil

    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    checkpoint = tmp_path / "my-gpt2"
    texts = pq.read_table(corpus).column("text").to_pylist()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"])
    tokenizer.train_from_iterator(texts, trainer)
    checkpoint.mkdir()
    tokenizer.save(str(checkpoint / "tokenizer.json"))
    config = transformers.GPT2Config(
        vocab_size=tokenizer.get_vocab_size(), n_positions=64, n_embd=32, n_layer=1, n_head=2
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(checkpoint)

    raw = lm_spec(corpus, tmp_path, epochs=1, max_steps=4).model_dump(mode="json")
    raw["data"]["tokenizer"] = {"kind": "file", "path": str(checkpoint / "tokenizer.json")}
    raw["model"] = {"kind": "hf_causal_lm", "pretrained": str(checkpoint)}
    spec = validate_spec(raw)
    outcome = run(spec)
    shutil.rmtree(checkpoint)

    assert outcome.history[-1]["step"] == 4
    predictor = LMPredictor(spec.registry, outcome.model.ref)
    done = predictor.complete(GenerationRequest(prompt="def ", max_tokens=5, temperature=0.0))
    assert done.completion_tokens <= 5
