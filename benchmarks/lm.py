"""Language-model throughput: kiln's training and serving against plain references, side by side.

    .venv/bin/python benchmarks/lm.py                 # both figures, about 4-5 minutes
    .venv/bin/python benchmarks/lm.py --trace         # + where the time goes, about 6 minutes
    .venv/bin/python benchmarks/lm.py --only train
    .venv/bin/python benchmarks/lm.py --only generate --registry DIR --ref NAME:VERSION

Corpus: the Python standard library sources (`kiln.data.examples.write_python_stdlib`, what
`kiln data example python-stdlib` runs), written once under `--data`, then capped to `--train-kb`
of training and `--val-kb` of validation text (whole files, in a stable hashed order of their
paths) in `--shards` Parquet files. Byte tokenizer, `--block-size` tokens per sequence.
Model: `causal_lm` (`--layers` x `--d-model`, `--heads` heads, about 1M parameters).

1. Training tokens/s. kiln: `kiln.train.run.run` on a local Ray this benchmark starts (Ray Data
   reads the files and packs them with the job's `TextPreprocessor`; a 2-worker TorchTrainer runs
   kiln's loop with DeepSpeed ZeRO-2 fp32 on gloo; per-epoch validation, sample generation and
   checkpoints; the best checkpoint is registered). Figure: the per-epoch `tokens_per_s` kiln
   reports (target tokens of all ranks / the epoch's training time). Reference: this file under
   `torchrun --standalone --nproc_per_node 2` (`--reference-job`): every rank packs the same
   files with the same `TextPreprocessor` (one Parquet file at a time, as kiln packs one Ray
   block per file), keeps its equal share in memory, and trains the same model (same seed, so
   the same initial weights) through `kiln.train.engine.build_engine` (the same DeepSpeed config
   from `deepspeed_config`), with the same micro-batch, kiln's own `token_loss` and a per-epoch
   seeded permutation, timed per epoch the same way. "Steady" = epochs >= 2 (epoch 1 carries
   start-up), harmonic mean. The reference runs before and after kiln (A-B-A: this machine's
   speed drifts over minutes); the ratio uses both. End-to-end wall times are printed beside.
2. Generation tokens/s. The model kiln just registered, greedy, `--max-tokens` per request, the
   corpus's function-signature prompts. Endpoint: kiln's Serve application (`build_app`, one
   replica, the model colocated in the ingress as `kiln serve` does for one model) on
   127.0.0.1, `POST /v1/completions`, keep-alive connections; `--requests` sequential requests,
   then `--clients` concurrent clients. Reference: `LMPredictor.complete` in this process on the
   same registered model, sequential and from `--clients` threads, and bare `generate_tokens`
   on the predictor's module, with torch at `--threads` threads (default 1: what Ray gives the
   0.5-CPU replica). tokens/s = completion tokens / wall time of the requests; the greedy texts
   of both sides are compared.

`--trace` adds diagnostics: kiln's loop wrapped in the workers (median step, time waiting for
batches, CPU per thread), the reference loop run by a plain Ray Train TorchTrainer with kiln's
worker resources, and the torchrun reference beside the idle local Ray. CPU use by process is
sampled from /proc throughout; a run during which processes outside this benchmark used more
than `OTHERS_NOISY` cores, or another Ray ran, is marked with `*`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.client
import json
import logging
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from _watch import Watch, raylets
from kiln.config.spec import JobSpec

logger = logging.getLogger("kiln.bench")

TRAIN_GOAL = 0.95
MODEL_NAME = "bench-lm"
TICK = os.sysconf("SC_CLK_TCK")
OTHERS_NOISY = 0.1
"""Cores used by processes outside this benchmark during a timed window that mark it noisy."""


# ----------------------------------------------------------------------------------------------
# Corpus and spec


def ensure_corpus(args: argparse.Namespace) -> Path:
    """The capped stdlib corpus for these sizes, written once under --data and reused."""
    from kiln.data.examples import write_python_stdlib

    full = Path(args.data) / "pystdlib"
    if not (full / "train").is_dir():
        logger.info("writing the python-stdlib corpus to %s (once)", full)
        write_python_stdlib(full, shards=4)
    out = Path(args.data) / f"pystdlib-{args.train_kb}k-{args.val_kb}k-s{args.shards}"
    if not (out / "train").is_dir():
        staging = out.with_name(out.name + ".staging")
        shutil.rmtree(staging, ignore_errors=True)
        cap_split(full / "train", staging / "train", args.train_kb * 1000, args.shards)
        cap_split(full / "validation", staging / "validation", args.val_kb * 1000, 1)
        shutil.copy(full / "prompts.parquet", staging / "prompts.parquet")
        staging.rename(out)
    return out


def cap_split(source: Path, out: Path, max_bytes: int, shards: int) -> None:
    """Whole documents of `source`, in the order of a hash of their path, until `max_bytes` of
    UTF-8 text; written as `shards` Parquet files of about equal size, one row group each."""
    table = pa.concat_tables(pq.read_table(path) for path in sorted(source.glob("*.parquet")))
    rows = sorted(table.to_pylist(), key=lambda row: hashlib.sha1(row["path"].encode()).digest())
    kept, size = [], 0
    for row in rows:
        if size >= max_bytes:
            break
        kept.append(row)
        size += len(row["text"].encode())
    out.mkdir(parents=True)
    per_shard = math.ceil(len(kept) / shards)
    for index in range(shards):
        part = pa.Table.from_pylist(kept[index * per_shard : (index + 1) * per_shard])
        pq.write_table(part, out / f"part-{index:05d}.parquet", row_group_size=max(1, len(part)))


def bench_spec(args: argparse.Namespace, corpus: Path, storage: Path) -> JobSpec:
    """The benchmarked job: causal_lm on byte tokens, DeepSpeed ZeRO-2 fp32, 2 workers, gloo."""
    return JobSpec.model_validate(
        {
            "name": MODEL_NAME,
            "data": {
                "train": str(corpus / "train"),
                "validation": str(corpus / "validation"),
                "task": "language_modeling",
                "tokenizer": {"kind": "byte"},
                "block_size": args.block_size,
            },
            "model": {
                "kind": "causal_lm",
                "n_layers": args.layers,
                "n_heads": args.heads,
                "d_model": args.d_model,
            },
            "train": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "num_workers": args.workers,
                "lr": 3e-3,
                "warmup_steps": 10,
                "log_every": 10**6,
                "storage": str(storage / "runs"),
                "max_failures": 0,
                "sample_prompt": "def ",
                "deepspeed": {"zero_stage": 2, "precision": "fp32"},
            },
            "registry": str(storage / "registry"),
        }
    )


def pack_files(spec: JobSpec) -> tuple[Any, Any, Any]:
    """The job's TextPreprocessor and every training file packed with it, one file at a time:
    (preprocessor, input_ids, labels), int32 (n, block_size)."""
    import numpy as np

    from kiln.data.source import resolve_files
    from kiln.data.text import build_text_preprocessor

    pre = build_text_preprocessor(spec.data)
    files = resolve_files(spec.data.train, spec.data.format)
    parts = [pre.transform_batch(pq.read_table(p, columns=[spec.data.text])) for p in files.paths]
    ids = np.concatenate([part["input_ids"] for part in parts])
    labels = np.concatenate([part["labels"] for part in parts])
    return pre, ids, labels


# ----------------------------------------------------------------------------------------------
# The torchrun reference (this file, run by torchrun with --reference-job)


def reference_rank(args: argparse.Namespace) -> None:
    """One torchrun rank: pack, keep this rank's share, train, write per-epoch figures."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    spec = JobSpec.model_validate_json(Path(args.reference_job).read_text())
    if args.reference_thread:  # as a Ray Train worker runs the loop: not on the main thread
        box: list[dict[str, Any]] = []
        thread = threading.Thread(target=lambda: box.append(reference_train(spec)))
        thread.start()
        thread.join()
        result = box[0]
    else:
        result = reference_train(spec)
    if dist.get_rank() == 0:
        Path(args.reference_out).write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()


def reference_train(spec: JobSpec) -> dict[str, Any]:
    """kiln's per-worker loop without Ray: same model, engine, micro-batch, loss, shuffling."""
    import torch
    import torch.distributed as dist

    from kiln.models import build_model
    from kiln.train.engine import build_engine
    from kiln.train.lm import token_loss

    rank, world = dist.get_rank(), dist.get_world_size()
    load_start = time.perf_counter()
    pre, all_ids, all_labels = pack_files(spec)
    per_rank = len(all_labels) // world  # equal shards, like streaming_split(equal=True)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    ids, labels = torch.from_numpy(all_ids[rows].copy()), torch.from_numpy(all_labels[rows].copy())
    load_s = time.perf_counter() - load_start

    train = spec.train
    torch.manual_seed(train.seed)
    model = build_model(
        spec.model,
        pre.input_schema(),
        activation_checkpointing=train.deepspeed.activation_checkpointing,
    )
    micro = train.batch_size // (world * train.deepspeed.grad_accum)
    steps_per_epoch = math.ceil(per_rank / micro)
    # As kiln.train.run.fit sizes the schedule.
    total_steps = train.epochs * max(1, math.ceil(steps_per_epoch / train.deepspeed.grad_accum))
    engine = build_engine(model, train, total_steps=total_steps)
    epochs = []
    for epoch in range(1, train.epochs + 1):
        engine.train()
        generator = torch.Generator().manual_seed(train.seed + epoch)
        order = torch.randperm(per_rank, generator=generator)
        order = order if train.shuffle else torch.arange(per_rank)
        dist.barrier()
        threads_before, wall_start = thread_cpu(), time.time()
        start, tokens, loss_sum, step_times = time.perf_counter(), 0, 0.0, []
        for first in range(0, per_rank, micro):
            step_start = time.perf_counter()
            index = order[first : first + micro]
            loss, count = token_loss(engine, {"input_ids": ids[index], "labels": labels[index]})
            engine.backward(loss)
            engine.step()
            tokens += count
            loss_sum += loss.item() * count
            step_times.append(time.perf_counter() - step_start)
        elapsed = time.perf_counter() - start
        totals = torch.tensor([float(tokens), loss_sum], dtype=torch.float64)
        dist.all_reduce(totals)
        epochs.append(
            {
                "epoch": epoch,
                "tokens_per_s": totals[0].item() / elapsed,
                "train_loss": totals[1].item() / totals[0].item(),
                "seconds": elapsed,
                "steps": len(step_times),
                "median_step_s": statistics.median(step_times),
                "start": wall_start,
                "end": time.time(),
                "thread_cpu": thread_delta(threads_before, thread_cpu()),
            }
        )
    return {
        "epochs": epochs,
        "load_s": load_s,
        "sequences": len(all_labels),
        "tokens": int((all_labels != -100).sum()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
    }


def run_torchrun(spec: JobSpec, workdir: Path, *, in_thread: bool = False) -> dict[str, Any]:
    """Train under `torchrun --nproc_per_node W`; per-epoch figures from rank 0, wall time.
    `in_thread`: each rank trains on a second thread (diagnostic)."""
    job, out = workdir / "job.json", workdir / "torchrun.json"
    job.write_text(spec.model_dump_json())
    out.unlink(missing_ok=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun),
        "--standalone",
        f"--nproc_per_node={spec.train.num_workers}",
        str(Path(__file__).resolve()),
        *("--reference-job", str(job), "--reference-out", str(out)),
        *(["--reference-thread"] if in_thread else []),
    ]
    started = time.perf_counter()
    # Its own process group, so that an interrupted benchmark takes the ranks down with it.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=1200)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"torchrun failed ({process.returncode}):\n{output[-4000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


# ----------------------------------------------------------------------------------------------
# kiln under Ray


def reference_in_ray(spec: JobSpec, workdir: Path) -> dict[str, Any]:
    """Diagnostic: the torchrun reference's loop (`reference_train`: in-memory tensors, no Ray
    Data) run by a 2-worker Ray Train TorchTrainer with kiln's worker resources, to tell the
    cost of the Ray worker environment from the cost of kiln's loop and ingest."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from kiln.cluster import plan_training

    out = workdir / "ray-reference.json"
    resources = ray.cluster_resources()
    plan = plan_training(spec.train, cluster_cpus=float(resources.get("CPU", 0)), cluster_gpus=0)
    trainer = TorchTrainer(
        functools.partial(_reference_worker, spec_json=spec.model_dump_json(), out=str(out)),
        scaling_config=ScalingConfig(
            num_workers=spec.train.num_workers, resources_per_worker=plan.worker_resources
        ),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name="ray-reference", storage_path=str(workdir / "ray-runs")),
    )
    started = time.perf_counter()
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    document: dict[str, Any] = json.loads(out.read_text())
    document["wall_s"] = time.perf_counter() - started
    return document


def _reference_worker(spec_json: str, out: str) -> None:
    import torch.distributed as dist

    result = reference_train(JobSpec.model_validate_json(spec_json))
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))


@contextlib.contextmanager
def local_ray(watch: Watch) -> Iterator[dict[str, float]]:
    """kiln's own local Ray (`kiln.cluster.connect`), shut down however the benchmark ends;
    yields {"start_s": seconds Ray took to start}."""
    import ray

    from kiln.cluster import connect

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)
    before = raylets()
    started = time.perf_counter()
    connect(None)
    timing = {"start_s": time.perf_counter() - started}
    watch.ours = raylets() - before
    try:
        yield timing
    finally:
        with contextlib.suppress(Exception):
            from ray import serve

            serve.shutdown()
        ray.shutdown()
        signal.signal(signal.SIGTERM, previous)
        for _ in range(30):  # let our raylet exit before the watch stops excusing it
            if not raylets() & watch.ours:
                break
            time.sleep(0.5)
        watch.ours = set()


def kiln_train(spec: JobSpec, trace_dir: Path | None) -> dict[str, Any]:
    """`kiln.train.run.run` (what `kiln train` calls); per-epoch metrics, packing counts.

    With `trace_dir`, kiln's loop in each worker is wrapped to time its steps (`traced_loop`).
    """
    import kiln.train.loop
    from kiln.train.run import RUN_FILE, run

    original = kiln.train.loop.train_loop_per_worker
    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        traced = functools.partial(traced_loop, trace_dir=str(trace_dir))
        kiln.train.loop.train_loop_per_worker = traced
    started = time.perf_counter()
    try:
        outcome = run(spec)
    finally:
        kiln.train.loop.train_loop_per_worker = original
    wall = time.perf_counter() - started
    stats = json.loads(Path(outcome.run_dir, RUN_FILE).read_text())["stats"]
    keys = ("epoch", "tokens_per_s", "train_loss", "val_perplexity", "val_unigram_perplexity")
    return {
        "epochs": [{k: m[k] for k in keys} for m in outcome.history],
        "sequences": int(stats["rows_used"]),
        "tokens": int(stats["train_tokens"]),
        "wall_s": wall,
        "ref": outcome.model.ref,
        "sample": outcome.history[-1].get("sample"),
    }


def traced_loop(config: dict[str, Any], trace_dir: str) -> Any:
    """In a Ray Train worker: kiln's loop, with its training batches timed (`timed_batches`)."""
    import kiln.train.loop

    original = kiln.train.loop.iter_micro_batches
    out = Path(trace_dir, f"rank-{os.getpid()}.jsonl")

    def traced(*args: Any, **kwargs: Any) -> Iterator[Any]:
        return timed_batches(original(*args, **kwargs), out)

    kiln.train.loop.iter_micro_batches = traced
    try:
        return kiln.train.loop.train_loop_per_worker(config)
    finally:
        kiln.train.loop.iter_micro_batches = original


def timed_batches(batches: Iterator[Any], out: Path) -> Iterator[Any]:
    """Yield from `batches`; then append to `out` one JSON line for the epoch: seconds spent
    waiting for batches (in next()), the first batch's wait, and the median step (the time
    between handing out a batch and asking for the next)."""
    import torch

    waits, steps = [], []
    threads_before = thread_cpu()
    wall_start, start = time.time(), time.perf_counter()
    iterator = iter(batches)
    while True:
        before = time.perf_counter()
        batch = next(iterator, None)
        waits.append(time.perf_counter() - before)
        if batch is None:
            break
        handed = time.perf_counter()
        yield batch
        steps.append(time.perf_counter() - handed)
    line = {
        "pid": os.getpid(),
        "steps": len(steps),
        "seconds": time.perf_counter() - start,
        "waited_s": sum(waits),
        "first_wait_s": waits[0],
        "median_step_s": statistics.median(steps) if steps else 0.0,
        "start": wall_start,
        "end": time.time(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "thread_cpu": thread_delta(threads_before, thread_cpu()),
    }
    with out.open("a") as f:
        f.write(json.dumps(line) + "\n")


class CpuSampler(threading.Thread):
    """Every second, the CPU seconds every process on the machine has used so far (from /proc),
    so that a timed window can be split into this benchmark's processes (its descendants: the
    torchrun ranks, or the local Ray and its workers) and everyone else's."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, dict[int, tuple[str, float, int]]]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while True:
            self.samples.append((time.time(), cpu_times()))
            if self._halt.wait(1.0):
                return

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def usage(self, start: float, end: float) -> dict[str, Any]:
        """CPU seconds in the samples bracketing [start, end]: `ours` per process label,
        `others` (processes outside this benchmark) per label, and the window's `seconds`."""
        first = max((s for s in self.samples if s[0] <= start), default=self.samples[0])
        last = min((s for s in self.samples if s[0] >= end), default=self.samples[-1])
        # A process that exits inside the window counts up to its last sample.
        latest: dict[int, tuple[str, float, int]] = {}
        for sample in self.samples:
            if first[0] <= sample[0] <= last[0]:
                latest.update(sample[1])
        parents = {pid: ppid for pid, (_, _, ppid) in latest.items()}
        ours: dict[str, float] = {}
        others: dict[str, float] = {}
        for pid, (label, cpu, _) in latest.items():
            used = cpu - first[1].get(pid, (label, 0.0, 0))[1]
            if used > 0.005:
                side = ours if descends(pid, os.getpid(), parents) else others
                side[label] = side.get(label, 0.0) + used
        return {"seconds": last[0] - first[0], "ours": ours, "others": others}


def descends(pid: int, root: int, parents: dict[int, int]) -> bool:
    seen = 0
    while pid > 1 and seen < 64:
        if pid == root:
            return True
        pid, seen = parents.get(pid, 0), seen + 1
    return False


def cpu_times() -> dict[int, tuple[str, float, int]]:
    """pid -> (a short label from its command line, user + system CPU seconds, parent pid)."""
    found: dict[int, tuple[str, float, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
        found[int(entry.name)] = (process_label(command), cpu, int(fields[1]))
    return found


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads so far, summed by thread name (`main` = the thread
    that trains)."""
    used: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = (
            "main"
            if int(task.name) == os.getpid()
            else stat[stat.index("(") + 1 : stat.rindex(")")]
        )
        fields = stat.rsplit(")", 1)[1].split()
        used[name] = used.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return used


def thread_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}


def process_label(command: str) -> str:
    """`ray::RayTrainWorker`, `raylet`, `gcs_server`, `python agent.py`, `torchrun rank`..."""
    words = command.split()
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0].split(".", 1)[0]
    program = Path(words[0]).name
    if "--reference-job" in words:
        return "torchrun rank"
    if program.startswith("python"):
        script = next((Path(w).name for w in words[1:] if not w.startswith("-")), "")
        return f"python {script}".strip()
    return program


def read_trace(trace_dir: Path) -> list[list[dict[str, Any]]]:
    """Per rank (worker process), its per-epoch trace lines."""
    files = sorted(trace_dir.glob("rank-*.jsonl"))
    return [[json.loads(line) for line in path.read_text().splitlines()] for path in files]


def steady_window(run: dict[str, Any]) -> tuple[float, float]:
    """Wall-clock span of epochs >= 2 (kiln: from the first traced rank, else the whole run)."""
    epochs = run["trace"][0] if run.get("trace") else run["epochs"]
    if "start" not in epochs[0]:
        return run["window"][0], run["window"][1]
    steady = epochs[1:] or epochs
    return steady[0]["start"], steady[-1]["end"]


def add_cpu_usage(results: dict[str, Any], sampler: CpuSampler) -> None:
    """Each training run's CPU by process during its steady epochs (see CpuSampler.usage)."""
    for run in results.get("train", {}).values():
        run["cpu"] = sampler.usage(*steady_window(run))


# ----------------------------------------------------------------------------------------------
# Generation: in-process and through the endpoint


def load_prompts(corpus: Path, count: int, fits: Callable[[str], bool]) -> list[str]:
    """The corpus's function-signature prompts (validation files) that leave room for the
    completion in the model's context, cycled to `count`."""
    prompts = pq.read_table(corpus / "prompts.parquet").column("prompt").to_pylist()
    prompts = [prompt for prompt in prompts if fits(prompt)]
    if not prompts:
        raise SystemExit("no prompt of the corpus fits the context with --max-tokens; lower it")
    return [prompts[i % len(prompts)] for i in range(count)]


def timed_requests(
    call: Callable[[str], tuple[str, int]], prompts: list[str], clients: int
) -> dict[str, Any]:
    """Run `call` on every prompt from `clients` threads (prompt i on thread i % clients);
    completion tokens / wall seconds, and the text of every prompt."""
    texts: list[str] = [""] * len(prompts)
    tokens = [0] * len(prompts)
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for i in range(offset, len(prompts), clients):
                texts[i], tokens[i] = call(prompts[i])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed, first: {errors[0]!r}")
    return {"tokens_per_s": sum(tokens) / elapsed, "tokens": sum(tokens), "texts": texts}


def in_process(args: argparse.Namespace, predictor: Any, prompts: list[str]) -> dict[str, Any]:
    """LMPredictor.complete in this process (sequential, then from --clients threads) and bare
    generate_tokens on the same module."""
    from kiln.inference.lm import GenerationRequest
    from kiln.models.generation import Sampling, generate_tokens

    def complete(prompt: str) -> tuple[str, int]:
        request = GenerationRequest(prompt=prompt, max_tokens=args.max_tokens, temperature=0.0)
        done = predictor.complete(request)
        return done.text, done.completion_tokens

    def bare(prompt: str) -> tuple[str, int]:
        ids = generate_tokens(
            predictor.module,
            predictor.encode_prompt(prompt),
            max_new_tokens=args.max_tokens,
            sampling=Sampling(),
            eos_id=predictor.tokenizer.eos_id,
        )
        generated = list(ids)
        return predictor.tokenizer.decode(generated), len(generated)

    timed_requests(complete, prompts[: args.warmup], 1)
    return {
        "generate_tokens": timed_requests(bare, prompts, 1),
        "sequential": timed_requests(complete, prompts, 1),
        "concurrent": timed_requests(complete, prompts, args.clients),
        "lm_server": lm_server_direct(args, predictor.ref, prompts),
        "to_thread": to_thread_direct(predictor, args.max_tokens, prompts),
    }


def to_thread_direct(predictor: Any, max_tokens: int, prompts: list[str]) -> dict[str, Any]:
    """Diagnostic: `LMPredictor.complete` handed to a thread once per request
    (`asyncio.to_thread`) from an asyncio loop: one hand-off per request instead of per token."""
    import asyncio

    from kiln.inference.lm import GenerationRequest

    async def all_prompts() -> dict[str, Any]:
        texts, tokens = [], 0
        start = time.perf_counter()
        for prompt in prompts:
            request = GenerationRequest(prompt=prompt, max_tokens=max_tokens, temperature=0.0)
            done = await asyncio.to_thread(predictor.complete, request)
            texts.append(done.text)
            tokens += done.completion_tokens
        elapsed = time.perf_counter() - start
        return {"tokens_per_s": tokens / elapsed, "tokens": tokens, "texts": texts}

    return asyncio.run(all_prompts())


def lm_server_direct(args: argparse.Namespace, ref: str, prompts: list[str]) -> dict[str, Any]:
    """Diagnostic: the replica's `LMServer.complete` awaited in this process on an asyncio loop
    (its generation thread and per-token hand-off to the loop, without Serve or HTTP)."""
    import asyncio

    from kiln.inference.lm_server import LMServer

    server = LMServer(args.registry, ref, MODEL_NAME, "cpu")

    async def all_prompts() -> dict[str, Any]:
        texts, tokens = [], 0
        start = time.perf_counter()
        for prompt in prompts:
            request = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0.0}
            done = await server.complete(request)
            texts.append(done["text"])
            tokens += int(done["completion_tokens"])
        elapsed = time.perf_counter() - start
        return {"tokens_per_s": tokens / elapsed, "tokens": tokens, "texts": texts}

    return asyncio.run(all_prompts())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Client:
    """`POST /v1/completions` over one keep-alive connection per thread."""

    def __init__(self, port: int, model: str, max_tokens: int) -> None:
        self.port, self.model, self.max_tokens = port, model, max_tokens
        self._local = threading.local()

    def complete(self, prompt: str, max_tokens: int | None = None) -> tuple[str, int]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens or self.max_tokens,
            "temperature": 0,
        }
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST /v1/completions: {response.status} {data[:300]!r}")
        document = json.loads(data)
        return document["choices"][0]["text"], int(document["usage"]["completion_tokens"])

    def reset(self) -> None:
        """Drop this thread's connection (the next request opens a new one)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None


def wait_ready(client: Client, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.complete("def ", max_tokens=1)
            return
        except (OSError, RuntimeError, http.client.HTTPException):
            client.reset()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def served(args: argparse.Namespace, ref: str, prompts: list[str]) -> dict[str, Any]:
    """The same requests through kiln's Serve app: `POST /v1/completions` on 127.0.0.1."""
    from ray import serve

    from kiln.inference.serve import build_app, http_options
    from kiln.inference.serve_spec import validate_serve_spec

    port = free_port()
    spec = {
        "name": "kiln-lm-bench",
        "registry": args.registry,
        "http": {"host": "127.0.0.1", "port": port},
        "limits": {"request_timeout_s": 120.0},
        "models": [
            {
                "name": MODEL_NAME,
                "ref": ref,
                "max_ongoing_requests": max(32, args.clients),
                "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                "ray_actor_options": {"num_cpus": 0.5},
            }
        ],
    }
    started = time.perf_counter()
    serve.start(http_options=http_options(validate_serve_spec(spec)))
    serve.run(build_app(spec), name=spec["name"], route_prefix="/")
    client = Client(port, MODEL_NAME, args.max_tokens)
    wait_ready(client)
    ready_s = time.perf_counter() - started
    try:
        timed_requests(client.complete, prompts[: args.warmup], 1)
        return {
            "ready_s": ready_s,
            "sequential": timed_requests(client.complete, prompts, 1),
            "concurrent": timed_requests(client.complete, prompts, args.clients),
        }
    finally:
        serve.delete(spec["name"])


def measure_generation(args: argparse.Namespace, ref: str, corpus: Path) -> dict[str, Any]:
    import torch

    from kiln.inference.lm import LMPredictor

    torch.set_num_threads(args.threads)
    predictor = LMPredictor(args.registry, ref)

    def fits(prompt: str) -> bool:
        return len(predictor.encode_prompt(prompt)) + args.max_tokens <= predictor.context_length

    prompts = load_prompts(corpus, args.requests, fits)
    logger.info("generation in-process: %s", ref)
    local = in_process(args, predictor, prompts)
    logger.info("generation through /v1/completions")
    endpoint = served(args, ref, prompts)
    return {"in_process": local, "endpoint": endpoint, "prompts": len(prompts)}


# ----------------------------------------------------------------------------------------------
# Figures


def steady_rate(epochs: list[dict[str, Any]]) -> float:
    """Harmonic mean of tokens/s over epochs >= 2 (equal-sized epochs: tokens / seconds)."""
    rates = [e["tokens_per_s"] for e in epochs if e["epoch"] >= 2]
    return statistics.harmonic_mean(rates or [e["tokens_per_s"] for e in epochs])


def report_train(results: dict[str, Any], noisy: set[str]) -> None:
    train = results["train"]
    width = max(map(len, train)) + 6
    first = next(iter(train.values()))["epochs"]
    header = "".join(f"{'epoch ' + str(e['epoch']):>10}" for e in first)
    print(f"\n{'training tokens/s':<{width}}{header}  last train loss   wall s")
    for name, run in train.items():
        label = name + (" *" if name in noisy else "")
        cells = "".join(f"{e['tokens_per_s']:>10,.0f}" for e in run["epochs"])
        loss = run["epochs"][-1]["train_loss"]
        print(f"{label:<{width}}{cells}  {loss:>15.4f} {run['wall_s']:>8.1f}")
    runs = [name for name in train if name in ("torchrun (before)", "torchrun (after)")]
    clean = [name for name in runs if name not in noisy] or runs  # drop a disturbed one
    base = steady_rate([e for name in clean for e in train[name]["epochs"]])
    kiln = train["kiln"]
    last = kiln["epochs"][-1]
    print()
    print(
        f"packed: kiln {kiln['sequences']:,} sequences / {kiln['tokens']:,} target tokens, "
        f"torchrun {train[runs[0]]['sequences']:,} / {train[runs[0]]['tokens']:,}"
    )
    print(
        f"kiln last epoch: val perplexity {last['val_perplexity']:.2f}, unigram baseline "
        f"{last['val_unigram_perplexity']:.2f}; sample {kiln['sample']!r}"
    )
    for name, run in train.items():
        if name != "kiln":
            steps = [f"{e['median_step_s'] * 1000:.0f}" for e in run["epochs"]]
            print(f"{name} median step ms per epoch: {', '.join(steps)}")
    for rank in kiln.get("trace", []):
        cells = ", ".join(
            f"{e['median_step_s'] * 1000:.0f} (waited {e['waited_s']:.2f} s, first "
            f"{e['first_wait_s']:.2f} s, of {e['seconds']:.1f} s)"
            for e in rank
        )
        print(
            f"kiln worker {rank[0]['pid']} (torch threads {rank[0]['torch_threads']}, "
            f"OMP_NUM_THREADS {rank[0]['omp_num_threads']}) median step ms per epoch: {cells}"
        )
    report_cpu(train)
    print(
        f"end-to-end wall: kiln {kiln['wall_s'] + results['ray_start_s']:.1f} s (Ray start "
        f"{results['ray_start_s']:.1f} s + `run`: read, pack and count in Ray Data, train, "
        "per-epoch validation, sample and checkpoint, register); torchrun "
        f"{statistics.mean(train[n]['wall_s'] for n in clean):.1f} s (process start, pack, train)"
    )
    kiln_rate = steady_rate(kiln["epochs"])
    print(
        f"train tokens/s: kiln {kiln_rate:,.0f}, torchrun {base:,.0f}, "
        f"ratio {kiln_rate / base:.2f} (goal >= {TRAIN_GOAL})"
    )
    for name in ("torchrun beside idle Ray", "reference loop in Ray Train"):
        if name in train:
            rate = steady_rate(train[name]["epochs"])
            print(f"diagnostic: {name} {rate:,.0f} tokens/s, ratio to torchrun {rate / base:.2f}")


def report_cpu(train: dict[str, Any]) -> None:
    """Where the CPU went during each run's steady epochs: processes, then threads of one
    training process."""
    print("\nCPU during epochs >= 2, cores (CPU s / wall s): this benchmark's processes | others")
    for name, run in train.items():
        cpu = run["cpu"]
        ours = sorted(cpu["ours"].items(), key=lambda item: -item[1])
        cells = ", ".join(f"{label} {used / cpu['seconds']:.2f}" for label, used in ours[:6])
        rest = sum(used for _, used in ours[6:]) / cpu["seconds"]
        others = sorted(cpu["others"].items(), key=lambda item: -item[1])
        other_cells = ", ".join(
            f"{label} {used / cpu['seconds']:.2f}" for label, used in others[:3]
        )
        total = sum(cpu["others"].values()) / cpu["seconds"]
        whole = (
            " (the whole `run`: epochs are timed only with --trace)"
            if "window" in run and not run.get("trace")
            else ""
        )
        print(f"  {name}{whole}: {cells}, rest {rest:.2f} | others {total:.2f} ({other_cells})")
    print("threads of one training process during epochs >= 2, CPU s per epoch:")
    sources = [(name, [run["epochs"]]) for name, run in train.items() if name != "kiln"]
    sources.append(("kiln", train["kiln"].get("trace", [])))
    for name, ranks in sources:
        for epochs in ranks[:1]:
            steady = [e for e in epochs[1:] if "thread_cpu" in e]
            if not steady:
                continue
            names = {thread for e in steady for thread in e["thread_cpu"]}
            per_epoch = {
                t: sum(e["thread_cpu"].get(t, 0.0) for e in steady) / len(steady) for t in names
            }
            top = sorted(per_epoch.items(), key=lambda item: -item[1])[:6]
            seconds = statistics.mean(e["seconds"] for e in steady)
            cells = ", ".join(f"{thread} {used:.2f}" for thread, used in top)
            print(f"  {name} (epoch {seconds:.1f} s): {cells}")


def report_generation(results: dict[str, Any], args: argparse.Namespace, noisy: bool) -> None:
    gen = results["generate"]
    local, endpoint = gen["in_process"], gen["endpoint"]
    mark = " *" if noisy else ""
    print(
        f"\ngeneration tokens/s{mark} (greedy, max_tokens {args.max_tokens}, {gen['prompts']} "
        f"requests, torch threads {args.threads})"
    )
    rows = [
        ("in-process generate_tokens, sequential", local["generate_tokens"]),
        ("in-process LMPredictor.complete, sequential", local["sequential"]),
        ("in-process LMServer.complete (asyncio), sequential", local["lm_server"]),
        ("in-process asyncio.to_thread(complete), sequential", local["to_thread"]),
        ("endpoint /v1/completions, sequential", endpoint["sequential"]),
        (f"in-process LMPredictor.complete, {args.clients} threads", local["concurrent"]),
        (f"endpoint /v1/completions, {args.clients} clients", endpoint["concurrent"]),
    ]
    for name, run in rows:
        print(f"  {name:<52}{run['tokens_per_s']:>10,.0f}   ({run['tokens']} tokens)")
    same = sum(
        a == b
        for a, b in zip(local["sequential"]["texts"], endpoint["sequential"]["texts"], strict=True)
    )
    print(f"same greedy text through the endpoint and in-process: {same}/{gen['prompts']}")
    print(f"endpoint ready after {endpoint['ready_s']:.1f} s (serve.start + serve.run)")
    for kind, label in (("sequential", "sequential"), ("concurrent", f"{args.clients} clients")):
        served_rate, base = endpoint[kind]["tokens_per_s"], local[kind]["tokens_per_s"]
        print(
            f"generate tokens/s, {label}: endpoint {served_rate:,.0f}, in-process "
            f"{base:,.0f}, ratio {served_rate / base:.2f}"
        )


def print_report(results: dict[str, Any], args: argparse.Namespace) -> None:
    print("\n== kiln LM benchmark", time.strftime("%Y-%m-%d %H:%M"), "==")
    noisy = set(results["noisy"])
    if noisy:
        print(
            "* another Ray shared the CPUs meanwhile: noisy; rerun when `pgrep -f raylet` is empty"
        )
    if "train" in results:
        print(
            f"corpus: python-stdlib, {args.train_kb} kB train / {args.val_kb} kB validation "
            f"text in {args.shards} files; byte tokens, block {args.block_size}; causal_lm "
            f"{args.layers} layers x d_model {args.d_model} ({results['parameters']:,} "
            f"parameters); batch {args.batch_size} over {args.workers} workers; "
            f"{args.epochs} epochs; ZeRO-2 fp32, gloo"
        )
        report_train(results, noisy)
    if "generate" in results:
        report_generation(results, args, "generate" in noisy)


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="/tmp/kiln-bench-lm", help="corpus cache directory")
    parser.add_argument("--train-kb", type=int, default=200, help="training text, kB")
    parser.add_argument("--val-kb", type=int, default=32, help="validation text, kB")
    parser.add_argument("--shards", type=int, default=2, help="training Parquet files")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4, help="training epochs (>= 2 timed)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (sequences)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per completion")
    parser.add_argument("--requests", type=int, default=16, help="generation requests per run")
    parser.add_argument("--warmup", type=int, default=2, help="requests before timing")
    parser.add_argument("--clients", type=int, default=4, help="concurrent generation clients")
    parser.add_argument("--threads", type=int, default=1, help="torch threads when generating")
    parser.add_argument("--only", choices=("train", "generate"), help="run one of the figures")
    parser.add_argument("--registry", help="--only generate: registry of --ref")
    parser.add_argument("--ref", help="--only generate: a registered language model")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="time kiln's training steps and batch waits in the workers (wraps the loop), "
        "and also run the reference loop in Ray Train workers (diagnostics)",
    )
    parser.add_argument("--json", help="write every figure here as JSON")
    parser.add_argument("--reference-job", help=argparse.SUPPRESS)
    parser.add_argument("--reference-out", help=argparse.SUPPRESS)
    parser.add_argument("--reference-thread", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only == "generate" and not (args.registry and args.ref):
        parser.error("--only generate needs --registry and --ref")
    if args.registry:
        args.registry = os.path.abspath(args.registry)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reference_job:
        reference_rank(args)
        return 0
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s")
    corpus = ensure_corpus(args)
    workdir = Path(tempfile.mkdtemp(prefix="kiln-bench-lm-"))
    spec = bench_spec(args, corpus, workdir)
    train, generate = args.only != "generate", args.only != "train"
    results: dict[str, Any] = {"args": vars(args)}
    watch, sampler = Watch(), CpuSampler()
    watch.start()
    sampler.start()
    try:
        if train:
            logger.info("torchrun reference (before)...")
            with watch.phase("torchrun (before)"):
                run = run_torchrun(spec, workdir)
            results["train"] = {"torchrun (before)": run}
            results["parameters"] = run["parameters"]
        with local_ray(watch) as timing:
            results["ray_start_s"] = timing["start_s"]
            if train:
                logger.info("kiln training...")
                trace = workdir / "trace" if args.trace else None
                with watch.phase("kiln"):
                    started = time.time()
                    run = kiln_train(spec, trace)
                    run["window"] = [started, time.time()]
                if trace is not None:
                    run["trace"] = read_trace(trace)
                results["train"]["kiln"] = run
                if args.trace:
                    logger.info("the reference loop in Ray Train workers...")
                    with watch.phase("reference loop in Ray Train"):
                        ray_run = reference_in_ray(spec, workdir)
                    results["train"]["reference loop in Ray Train"] = ray_run
                    logger.info("torchrun reference beside the idle local Ray...")
                    with watch.phase("torchrun beside idle Ray"):
                        beside = run_torchrun(spec, workdir)
                    results["train"]["torchrun beside idle Ray"] = beside
                args.registry, args.ref = spec.registry, run["ref"]
            if generate:
                with watch.phase("generate"):
                    results["generate"] = measure_generation(args, args.ref, corpus)
        if train:
            logger.info("torchrun reference (after)...")
            with watch.phase("torchrun (after)"):
                results["train"]["torchrun (after)"] = run_torchrun(spec, workdir)
    finally:
        watch.stop()
        sampler.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    add_cpu_usage(results, sampler)
    results["noisy"] = watch.noisy() + [
        name
        for name, run in results.get("train", {}).items()
        if sum(run["cpu"]["others"].values()) / run["cpu"]["seconds"] > OTHERS_NOISY
    ]
    print_report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    sys.exit(main())
