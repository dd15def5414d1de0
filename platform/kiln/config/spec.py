"""The job spec: one YAML document, parsed once at the edge into these typed models.

Field docstrings double as `--help`/`kiln schema` text, so they say what a user needs to know.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=False)


class PreprocessSpec(_Spec):
    dedupe: bool = False
    """Drop exact duplicate rows of the training split (features and label) before fitting."""
    missing: Literal["drop", "mean", "median", "constant"] = "mean"
    """How to treat missing feature values: drop the row, or fill with the training mean, median or
    `fill_value`. Categorical columns fill with their most frequent value unless `missing` is
    `constant` (then the unknown bucket / all-zero one-hot). Rows with a missing label are always
    dropped and counted."""
    fill_value: float = 0.0
    """Value used when `missing: constant`."""
    scaling: Literal["standard", "minmax", "none"] = "standard"
    """Numeric feature scaling fitted on the training split."""
    categorical: Literal["onehot", "index"] = "onehot"
    """Encoding of categorical (string, bool or dictionary) columns: one-hot, or an integer index
    with an explicit unknown bucket (0) that the model embeds."""
    categorical_columns: list[str] | None = None
    """Columns to treat as categorical. Default: every string, bool or dictionary column."""
    max_categories: int = Field(default=100, ge=1, le=100_000)
    """Most frequent categories kept per column; rarer ones map to the unknown bucket."""


class TokenizerSpec(_Spec):
    """How text becomes token ids (data.task language_modeling); saved with the model."""

    kind: Literal["byte", "bpe", "file"] = "byte"
    """`byte`: UTF-8 bytes (256 ids) plus an end-of-text id, nothing to fit. `bpe`: a byte-level
    BPE vocabulary trained on the training split with the `tokenizers` library. `file`: a
    Hugging Face `tokenizer.json` on disk (`path`), e.g. the one beside a local checkpoint that
    `hf_causal_lm` fine-tunes."""
    vocab_size: int = Field(default=4096, ge=260, le=1_000_000)
    """bpe: vocabulary size to train, special tokens included."""
    min_frequency: int = Field(default=2, ge=1)
    """bpe: pairs seen fewer times than this are not merged."""
    train_sample_mb: float = Field(default=64.0, gt=0.0)
    """bpe: the tokenizer trains on the first this-many MB (10^6 bytes of UTF-8) of the training
    split's text, streamed in file order."""
    path: str | None = None
    """file: path of the `tokenizer.json`."""
    eos_token: str | None = None
    """file: the special token that ends each document. Default: the first of
    `<|endoftext|>`, `</s>`, `<eos>`, `<|end_of_text|>` the tokenizer knows."""

    @model_validator(mode="after")
    def _path_for_file(self) -> TokenizerSpec:
        if self.kind == "file" and not self.path:
            raise ValueError(
                "data.tokenizer.kind file needs data.tokenizer.path (a tokenizer.json)"
            )
        if self.kind != "file" and (self.path or self.eos_token):
            raise ValueError("data.tokenizer.path and eos_token apply only to kind: file")
        return self


class DataSpec(_Spec):
    train: str
    """Training data: a file, a directory, a glob (`data/*.parquet`) or a pyarrow filesystem URI
    (`s3://bucket/prefix`, `gs://...`, `file:///...`)."""
    validation: str | None = None
    """Validation data in the same forms as `train`. Give this or `validation_split`."""
    validation_split: float | None = Field(default=None, gt=0.0, lt=1.0)
    """Fraction of the training rows held out for validation, chosen by a stable hash of each row
    (identical rows land on the same side, so duplicates never leak across the split)."""
    format: Literal["parquet", "csv", "jsonl"] = "parquet"
    """File format of `train` and `validation`."""
    label: str | None = None
    """Name of the label column (classification and regression)."""
    features: list[str] | None = None
    """Feature columns, in order. Default: every column but the label."""
    task: Literal["classification", "regression", "language_modeling"] = "classification"
    """Classification (labels may be ints or strings), regression (numeric label), or
    language_modeling: next-token prediction on the documents in the `text` column."""
    text: str = "text"
    """language_modeling: the column holding one document per row."""
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    """language_modeling: how documents become token ids."""
    block_size: int = Field(default=128, ge=2, le=1_048_576)
    """language_modeling: tokens per training sequence. Documents (each ended by the
    end-of-text token) are concatenated and cut into blocks of this length inside the Ray Data
    pipeline; only the last block of each batch of documents is padded, and padding is never a
    target."""
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)
    """Preprocessing fitted on the training split and saved with the model."""
    cache: bool | Literal["auto"] = "auto"
    """Keep the preprocessed training and validation rows in Ray's object store (spilling to
    disk if it fills) after one pass, so epochs after the first skip reading and preprocessing.
    `auto` caches when they take at most a quarter of the cluster's object store memory;
    `false` streams from the files every epoch."""

    @model_validator(mode="after")
    def _one_validation_source(self) -> DataSpec:
        if self.task == "language_modeling":
            if self.label is not None or self.features is not None:
                raise ValueError(
                    "data.label and data.features do not apply to language_modeling; "
                    "name the text column with data.text"
                )
        elif self.label is None:
            raise ValueError(f"data.label: required for task {self.task}")
        if self.validation is None and self.validation_split is None:
            raise ValueError("give either data.validation (a path) or data.validation_split (0..1)")
        if self.validation is not None and self.validation_split is not None:
            raise ValueError("give data.validation or data.validation_split, not both")
        if self.features is not None:
            if self.label in self.features:
                raise ValueError(f"data.features must not contain the label column {self.label!r}")
            if len(set(self.features)) != len(self.features):
                raise ValueError("data.features lists a column twice")
        return self


class ModelSpec(_Spec):
    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)
    kind: str = "tabular_mlp"
    """A built-in model kind (`tabular_mlp`, `causal_lm`, `hf_causal_lm`) or a user factory
    `package.module:function`, called as `factory(spec, input_schema)` and returning a
    `torch.nn.Module`. Other keys in this section are that kind's options (`tabular_mlp`:
    hidden_sizes, dropout, activation, embedding_dim; `causal_lm`: n_layers, n_heads, d_model,
    d_ff, context_length, positions, rope_theta, tied_embeddings, dropout, bias, init_std;
    `hf_causal_lm`: config or pretrained)."""

    @property
    def options(self) -> dict[str, Any]:
        """The kind's options: every key of this section except `kind`."""
        return dict(self.model_extra or {})


class DeepSpeedSpec(_Spec):
    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO partitioning stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision. bf16 needs a GPU (or CPU) with bf16 support; fp16 uses dynamic loss
    scaling and needs a GPU."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    grad_clip: float | None = Field(default=1.0, gt=0.0)
    """Clip the global gradient norm to this value; null turns clipping off."""
    offload_optimizer: bool = False
    """ZeRO-Offload: keep optimizer state and step on the CPU (needs zero_stage >= 1)."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (models that support it)."""
    fused_optimizer: bool = False
    """Use DeepSpeed's fused Adam (fast on GPUs; JIT-builds a kernel on first use). Off: torch
    AdamW handed to DeepSpeed, which needs no build."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Extra raw DeepSpeed config keys merged over the generated config (expert escape hatch)."""

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedSpec:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("train.deepspeed.offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class TrainSpec(_Spec):
    epochs: int = Field(default=10, ge=1)
    """Passes over the training split."""
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps in all, even inside an epoch (that epoch is then
    evaluated, checkpointed and reported as usual, and the run ends). The learning-rate schedule
    spans the steps the run will take. Default: no limit."""
    batch_size: int = Field(default=256, ge=1)
    """Global batch size per optimizer step, across all workers and accumulation steps. Must divide
    by num_workers * deepspeed.grad_accum."""
    lr: float = Field(default=1e-3, gt=0.0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    """AdamW decoupled weight decay."""
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warm-up steps, then cosine decay to zero over the remaining optimizer steps."""
    seed: int = 0
    """Seed for weight init, shuffling and the validation split."""
    shuffle: bool = True
    """Shuffle the training rows each epoch: each worker shuffles the rows of every block of
    16384 it fetches (a local shuffle, seeded by `train.seed` and the epoch)."""
    num_workers: int = Field(default=2, ge=1)
    """Training workers (one process each; one GPU each when use_gpu)."""
    use_gpu: bool = False
    """Train on GPUs with nccl; otherwise CPUs with gloo."""
    resources_per_worker: dict[str, float] | None = None
    """Ray resources per worker, e.g. {CPU: 4, GPU: 1}. Default: {CPU: 1} (+ {GPU: 1} with
    use_gpu), shrunk to fit beside Ray Data on a small local machine."""
    data_cpus: float = Field(default=1.0, ge=1.0)
    """CPUs reserved for Ray Data's reading and preprocessing beside the training workers, so
    they never starve each other. At least 1: Ray Data's file-listing task asks for a whole CPU."""
    placement: Literal["PACK", "SPREAD"] = "PACK"
    """How training workers are placed on nodes: PACK fills as few nodes as possible, SPREAD puts
    them on as many different nodes as possible."""
    checkpoint_every: int = Field(default=1, ge=1)
    """Checkpoint every N epochs (the last epoch always checkpoints)."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """Checkpoints kept, best by `metric`."""
    max_failures: int = Field(default=2, ge=-1)
    """Worker-group restarts from the latest checkpoint after a failure (-1: unlimited)."""
    storage: str = "./.kiln/runs"
    """Where runs and checkpoints are written: a local path or a pyarrow filesystem URI that every
    node can reach."""
    shared_storage: bool = False
    """Declare that the local paths in `train.storage` and `registry` are a filesystem every node
    mounts (NFS, a shared volume). Without it, a run on a cluster whose nodes sit on more than one
    host is refused when either is a local path."""
    metric: str | None = None
    """Validation metric that picks the best checkpoint. Default: val_accuracy for classification,
    val_loss for regression."""
    mode: Literal["max", "min"] | None = None
    """Whether `metric` is better high or low. Default: from the metric's name."""
    log_every: int = Field(default=20, ge=1)
    """Rank 0 prints a progress line every N optimizer steps."""
    sample_prompt: str = "\n"
    """language_modeling: after each epoch rank 0 logs a greedy continuation of this prompt."""
    sample_tokens: int = Field(default=48, ge=0)
    """language_modeling: tokens in that sample (0: no sample)."""
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    """DeepSpeed engine settings."""

    @field_validator("resources_per_worker")
    @classmethod
    def _positive_resources(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, amount in (value or {}).items():
            if amount < 0:
                raise ValueError(f"resource {key!r} must be >= 0, got {amount}")
        return value

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainSpec:
        per_step = self.num_workers * self.deepspeed.grad_accum
        if self.batch_size % per_step:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must divide by num_workers * "
                f"deepspeed.grad_accum ({self.num_workers} * {self.deepspeed.grad_accum})"
            )
        if self.deepspeed.precision == "fp16" and not self.use_gpu:
            raise ValueError("train.deepspeed.precision fp16 needs train.use_gpu: true")
        return self


class SearchDimension(_Spec):
    """One swept spec path: a distribution to sample from, or values to try."""

    sample: Literal["loguniform", "uniform", "randint", "choice", "grid"]
    """`loguniform`/`uniform` draw a float in [low, high]; `randint` an integer in [low, high);
    `choice` one of `values` at random; `grid` every one of `values` (each grid point runs
    `tune.num_samples` times)."""
    low: float | None = None
    """Lower bound (loguniform, uniform, randint); > 0 for loguniform."""
    high: float | None = None
    """Upper bound (loguniform, uniform, randint; exclusive for randint)."""
    values: list[Any] | None = None
    """The candidates of `choice` and `grid`: any YAML values (numbers, strings, lists)."""

    @model_validator(mode="after")
    def _bounds_or_values(self) -> SearchDimension:
        if self.sample in ("choice", "grid"):
            if not self.values or self.low is not None or self.high is not None:
                raise ValueError(f"{self.sample} takes a non-empty `values` list and no low/high")
            return self
        if self.low is None or self.high is None or self.values is not None:
            raise ValueError(f"{self.sample} takes `low` and `high` and no `values`")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.sample == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {self.low:g})")
        if self.sample == "randint" and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError("randint takes integer low and high")
        return self


class SchedulerSpec(_Spec):
    kind: Literal["fifo", "asha", "pbt"] = "fifo"
    """`fifo` runs every trial to the end; `asha` stops trials that trail at each rung;
    `pbt` (population based training) periodically replaces the worst trials with mutated
    copies of the best, cloning their checkpoints."""
    grace_period: int = Field(default=1, ge=1)
    """ASHA: epochs every trial runs before it can be stopped."""
    reduction_factor: float = Field(default=2.0, gt=1.0)
    """ASHA: 1/reduction_factor of the trials reaching a rung go on to the next."""
    perturbation_interval: int = Field(default=1, ge=1)
    """PBT: epochs between exploit/explore steps."""
    quantile_fraction: float = Field(default=0.25, gt=0.0, le=0.5)
    """PBT: the bottom fraction of trials clones the top fraction."""
    mutations: dict[str, SearchDimension] = Field(default_factory=dict)
    """PBT: dotted spec paths resampled or perturbed at each exploit step. Default: the
    `tune.space` entries that are not `grid`."""

    @model_validator(mode="after")
    def _mutations_sampled(self) -> SchedulerSpec:
        for path, dim in self.mutations.items():
            if dim.sample == "grid":
                raise ValueError(f"mutations.{path}: PBT cannot mutate a grid; use choice")
        return self


class TuneSpec(_Spec):
    """A hyperparameter sweep: every trial runs the same trainer `kiln train` runs, with the
    spec paths in `space` set to sampled values."""

    space: dict[str, SearchDimension]
    """Search space: dotted spec paths (`train.lr`, `model.hidden_sizes`,
    `train.deepspeed.zero_stage`) to a distribution or list of values."""
    metric: str | None = None
    """Metric that ranks trials. Default: `train.metric` (val_accuracy for classification,
    val_loss for regression)."""
    mode: Literal["max", "min"] | None = None
    """Whether `metric` is better high or low. Default: from the metric's name."""
    num_samples: int = Field(default=4, ge=1)
    """Trials sampled from the space (times each grid point)."""
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    """Trials running at once. Default: as many as fit beside Ray Data on the cluster."""
    time_budget_s: float | None = Field(default=None, gt=0.0)
    """Stop starting and running trials after this many seconds; finished ones still count."""
    search: Literal["random", "optuna"] = "random"
    """`random` search (grid values expanded), or Optuna's TPE that samples from results."""
    seed: int = 0
    """Seed of the search algorithm, so a sweep samples the same configs again."""
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    """When trials stop early (ASHA) or clone better ones (PBT)."""

    @model_validator(mode="after")
    def _space_fits_search(self) -> TuneSpec:
        if not self.space:
            raise ValueError("tune.space must name at least one dotted spec path to sweep")
        for path, dim in self.space.items():
            head = path.split(".", 1)[0]
            if head not in ("data", "model", "train") or "." not in path:
                raise ValueError(
                    f"tune.space.{path}: sweep a path under data., model. or train. (e.g. train.lr)"
                )
            if dim.sample == "grid" and self.search == "optuna":
                raise ValueError(f"tune.space.{path}: grid needs tune.search random")
        return self


class GenerationSpec(_Spec):
    """Batch generation settings (`score.task: generate`): the prompt column and sampling."""

    prompt_column: str = Field(default="prompt", min_length=1)
    """Input column of prompt text; one completion per row."""
    max_tokens: int = Field(default=16, ge=1)
    """Most tokens generated per prompt; prompt plus max_tokens must fit the model's context."""
    temperature: float = Field(default=0.0, ge=0.0)
    """Sampling temperature; 0 is greedy decoding."""
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    """Nucleus sampling threshold."""
    top_k: int | None = Field(default=None, ge=1)
    """Sample from the k most likely tokens."""
    stop: list[str] = Field(default_factory=list)
    """Strings that end a completion."""
    seed: int | None = None
    """Sampling seed, the same for every row."""


class ScoreSpec(_Spec):
    """Batch scoring of a registered model, for `jobs/score.py` and `kiln submit --kind score`."""

    model: str | None = None
    """Model reference: NAME, NAME:VERSION or NAME@ALIAS. Default: `<name>@production`."""
    input: str
    """Rows to score: a file, directory, glob or pyarrow filesystem URI."""
    output: str
    """Output directory (path or URI) for the scored Parquet; must not exist or be empty, unless
    `overwrite`."""
    format: Literal["parquet", "csv", "jsonl"] = "parquet"
    """File format of `input`."""
    batch_size: int = Field(default=1024, ge=1)
    """Rows per model call."""
    concurrency: tuple[int, int] = (1, 1)
    """Scoring actors as [min, max]; the pool autoscales between them. A single number pins it."""
    on_error: Literal["fail", "quarantine"] = "fail"
    """A row that cannot be scored fails the job naming its file and row (`fail`), or is written
    with its reason to `output/_errors/` (`quarantine`)."""
    key: str | None = None
    """Input column carried into the output to identify rows. Default: a `key` column of
    FILE:ROW."""
    cpus_per_worker: float = Field(default=0.5, gt=0.0)
    """CPUs per scoring actor."""
    overwrite: bool = False
    """Replace a non-empty `output`."""
    task: Literal["predict", "generate"] = "predict"
    """`predict`: score rows with a tabular model; `generate`: complete each row's prompt with a
    language model (see `generation`)."""
    generation: GenerationSpec | None = None
    """Prompt column and sampling for `task: generate` (defaults when omitted)."""

    @field_validator("concurrency", mode="before")
    @classmethod
    def _pair(cls, value: Any) -> Any:
        return (value, value) if isinstance(value, int) else value

    @model_validator(mode="after")
    def _ordered(self) -> ScoreSpec:
        low, high = self.concurrency
        if low < 1 or high < low:
            raise ValueError(f"score.concurrency needs 1 <= min <= max, got [{low}, {high}]")
        if self.generation is not None and self.task != "generate":
            raise ValueError("score.generation applies to score.task: generate only")
        return self


class RetrainSpec(_Spec):
    """`kiln retrain`: fine-tune a registered model on new data, then promote the new version
    only if it scores no worse on held-out data than the version it started from."""

    freeze: list[str] = Field(default_factory=list)
    """Parameter-name prefixes kept frozen at the registered weights (`blocks.0` freezes
    `blocks.0.0.weight` and `blocks.0.0.bias`; matched at dots). A prefix matching no parameter
    is an error that lists the model's parameters."""
    margin: float = Field(default=0.0, ge=0.0)
    """How much worse than the old version the new one may score on `holdout` and still be
    promoted, in the units of the spec's metric (`train.metric`): absolute, not relative."""
    promote_to: str = Field(default="production", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
    """The alias that moves to the new version when it passes the gate."""
    holdout: str | None = None
    """Held-out data (same format, features and label) both versions are scored on. Default:
    `data.validation`, the spec's own validation files, which `--data` does not replace."""

    @field_validator("freeze")
    @classmethod
    def _plain_prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            if not prefix or prefix.startswith(".") or prefix.endswith("."):
                raise ValueError(f"freeze prefix {prefix!r}: a dotted parameter-name prefix")
        return value


class TrackingSpec(_Spec):
    """Where runs are recorded (MLflow), and what the end of a run writes beside them."""

    enabled: bool = True
    """Record the run (params, per-epoch metrics, status, the registered model as a tag and
    the report as artefacts) in the tracking store; `false` writes nothing."""
    uri: str | None = None
    """MLflow tracking URI. Default: `$MLFLOW_TRACKING_URI`, else `sqlite:///` on
    `./.kiln/mlflow.db` with artefacts under `./.kiln/mlartifacts` (an sqlite store keeps its
    artefacts in `mlartifacts` beside the database file)."""
    experiment: str | None = None
    """MLflow experiment the runs go to. Default: the job's `name`."""
    tensorboard: bool = False
    """Also write TensorBoard event files (per-epoch scalars, step = epoch) under
    `<run dir>/tensorboard`; a sweep writes one per trial, in each trial's run directory."""
    report: bool = True
    """Write the HTML report (and its PNGs) at the end of `kiln train`/`kiln tune`, under
    `<run dir>/report`, and log them as the run's artefacts; a report that fails only warns."""


class JobSpec(_Spec):
    """A kiln job: data, model, training and where the result is registered."""

    name: str = Field(pattern=_NAME_PATTERN)
    """Model name in the registry (letters, digits, `_ . -`)."""
    data: DataSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    registry: str = "./.kiln/registry"
    """Model registry root: a local path or a pyarrow filesystem URI."""
    tune: TuneSpec | None = None
    """A hyperparameter sweep for `kiln tune`; `kiln train` ignores it."""
    score: ScoreSpec | None = None
    """Batch scoring for `jobs/score.py` / `kiln submit --kind score`; `kiln train` ignores it."""
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    """Run tracking: MLflow store, experiment, TensorBoard files, end-of-run report."""
    retrain: RetrainSpec | None = None
    """Warm-start fine-tuning with a gated promotion, for `kiln retrain`; `kiln train` ignores
    it."""

    @property
    def metric(self) -> str:
        """The validation metric that ranks checkpoints."""
        if self.train.metric:
            return self.train.metric
        return "val_accuracy" if self.data.task == "classification" else "val_loss"

    @property
    def mode(self) -> Literal["max", "min"]:
        """'max' or 'min' for `metric`."""
        if self.train.mode:
            return self.train.mode
        lower_is_better = ("loss", "mse", "mae", "rmse", "perplexity")
        return "min" if self.metric.endswith(lower_is_better) else "max"

    @model_validator(mode="after")
    def _metric_fits_task(self) -> JobSpec:
        allowed = {
            "classification": {"val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1"},
            "regression": {"val_loss", "val_mse", "val_mae", "val_r2"},
            "language_modeling": {"val_loss", "val_perplexity"},
        }[self.data.task]
        if self.train.metric is not None and self.train.metric not in allowed:
            raise ValueError(
                f"train.metric {self.train.metric!r} is not reported for {self.data.task}; "
                f"choose one of {sorted(allowed)}"
            )
        tune_metric = self.tune.metric if self.tune is not None else None
        if tune_metric is not None and tune_metric not in allowed:
            raise ValueError(
                f"tune.metric {tune_metric!r} is not reported for {self.data.task}; "
                f"choose one of {sorted(allowed)}"
            )
        return self
