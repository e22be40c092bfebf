"""Jobs are recipes. A recipe declares only what differs between jobs (its options, model loader, tokenize step,
collator, evaluation, HF trainer class, promotion metrics, smoke example, prediction format, MLflow flavor task);
the training core (`tasks/training.py`), the training flow, the CLI, promotion, `compare`, `predict` and
`deployments/trigger.py` read them from this registry and never switch on a job's name.

A new job is one module that builds a `Recipe` and calls `register(recipe)`. The built-in jobs register on first
use of the registry; a package can add jobs through the `finetune_flows.jobs` entry-point group (each entry point
names a module to import)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from tasks.common import ConfigError
from tasks.data import DataConfig
from tasks.training import LoraConfig, TrainConfig

BUILTIN = ("tasks.jobs.classify", "tasks.jobs.mlm")
ENTRY_POINT_GROUP = "finetune_flows.jobs"


class JobSpec(BaseModel):
    """What the ground floor needs to know about one run of a job: the config sections the tasks take, the job's
    own options (validated by its recipe) and, for labelled data, the label names. Small and serialisable, so it
    travels between tasks, into checkpoints and beside each saved model."""

    model_config = ConfigDict(extra="forbid")

    job: str
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    peft: str = "none"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    options: dict[str, Any] = Field(default_factory=dict)
    label_names: list[str] | None = None
    # The metric that decides promotion (any spelling `resolve_metric` accepts; None: the job's default). Training
    # selects the registered epoch (`train.select: best`) and stops early by the same metric.
    promotion_metric: str | None = None

    @property
    def recipe(self) -> "Recipe":
        return get(self.job)

    @property
    def opts(self) -> Any:
        """The job's options as its recipe's typed model (engine, mlm_probability, ...)."""
        return self.recipe.options.model_validate(self.options)

    @property
    def engine(self) -> str:
        return self.opts.engine

    @property
    def selection_metric(self) -> tuple[str, bool]:
        """(logged metric key, higher is better) of the promotion metric: what picks the best epoch."""
        return self.recipe.promotion.metrics[resolve_metric(self.job, self.promotion_metric, self.options)]


@dataclass(frozen=True)
class Promotion:
    """Promotion metrics a job allows: canonical name -> (logged metric key, higher is better)."""

    default: str
    metrics: dict[str, tuple[str, bool]]


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str                  # one line: `finetune <name> --help`, the flow's description
    example: str                      # a command line shown by --help
    options: type[BaseModel]          # the job's own config fields; must have `engine` ("manual" = plain loop)
    registered_model: str             # default registry name
    hf_task: str                      # transformers pipeline task = the MLflow transformers flavor task
    metrics: tuple[str, ...]          # eval metric names, as logged per epoch (train_loss comes on top)
    promotion: Promotion
    smoke_example: str                # one text a healthy model must answer (smoke test, predict hint, example)
    # (data_path, model, spec) -> tokenized dataset dir with `train` and `eval` splits
    tokenize: Callable[[str, str, JobSpec], str]
    # (model path, spec) -> a fresh model with the job's head
    load_model: Callable[[str, JobSpec], Any]
    # (tokenizer, spec) -> collate_fn for both splits
    collator: Callable[[Any, JobSpec], Any]
    # THE evaluation of the job: (model, eval loader, device, amp dtype) -> {metric: float, ...}; keys that are not
    # floats (e.g. predictions) are extras for `artifacts`, not metrics
    evaluate: Callable[..., dict]
    # spec -> the transformers.Trainer subclass the non-manual engine runs; (spec, output_dir, hf kwargs) -> its args
    trainer_class: Callable[[JobSpec], type]
    trainer_args: Callable[[JobSpec, str, dict], Any]
    # (model_uri, texts, top_k) -> one result per text (the shapes `tasks.predict.format_predictions` prints)
    predict: Callable[[str, list[str], int], list]
    # list of prediction results -> error message or None (is the answer well formed?)
    check_prediction: Callable[[list], str | None]
    # optional hooks
    check_model: Callable[[str, int], dict] | None = None          # cheap checks before any data work
    # (freshly loaded model, tokenized path, spec) -> None: data-dependent initialisation of weights the checkpoint
    # did not ship (MLM: the new head's output bias from the training tokens' frequencies); full fine-tuning only
    init_model: Callable[[Any, str, JobSpec], None] | None = None
    # (model, batch on the device) -> the training loss of the plain loop, under its autocast; None: the model's
    # own `model(**batch).loss`. For a cheaper exact loss (MLM: the head on the masked positions only).
    loss: Callable[[Any, dict], Any] | None = None
    data_stats: Callable[[str], dict] | None = None                # tokenized path -> counts to log as data.* params
    run_tags: Callable[[dict, Any], dict] | None = None            # (model info, prepared data) -> MLflow tags
    artifacts: Callable[..., tuple[list[str], str]] | None = None  # (run_dir, model_dir, extras, spec) -> paths, text
    align_eval: Callable[[Any, JobSpec], Callable | None] | None = None  # registry model -> batch label remap
    eval_before_training: bool = False                              # log an epoch-0 evaluation
    # an eval text -> the job's input for the summary's `finetune predict` hint (MLM masks a word); None: as is
    example_from: Callable[[str], str | None] | None = None
    # The quality floor: (prepared data path, the run's history, spec) -> the trivial baseline's scores on the same
    # eval data, by canonical promotion metric name. No version becomes champion, not even the first, unless it
    # beats it (tasks/promotion.py). None, or a metric the hook does not score: no floor for that metric.
    baseline: Callable[[str, list[dict], JobSpec], dict[str, float]] | None = None
    baseline_name: str = "trivial"                                  # named in the decision: "the <name> baseline"
    needs_labels: bool = True                                       # labelled data (label names, num_labels)
    data_defaults: dict = field(default_factory=dict)               # DataConfig defaults for this job
    train_defaults: dict = field(default_factory=dict)              # TrainConfig defaults for this job
    embedded_defaults: dict = field(default_factory=dict)           # sample counts on the embedded data
    learning_rate: float = 5e-5                                     # default peak learning rate
    lora_learning_rate: float = 5e-4                                # ... with `peft: lora` (adapters like more)
    peft_task_type: str | None = None                               # peft TaskType name, None for a custom one
    config_name: str | None = None                                  # the config class name (default: <Name>Config)
    # Jobs with kinds (classify's `problem`): options -> what differs by kind, {"promotion": Promotion (the
    # allowed metrics, a subset of `promotion`'s, and the default), "baseline_name": str}; None: as declared above
    for_options: Callable[[dict], dict] | None = None
    # spec -> (model, batch) -> training loss, or None for `loss` / the model's own: a loss that depends on the run
    # (class weights); both engines use it (the Trainer through `trainer_class`)
    loss_for: Callable[[JobSpec], Callable | None] | None = None
    # (spec, prepared data path) -> the spec with data-dependent options resolved (class weights from the train
    # split's label counts), before tokenizing; travels with the spec to the ranks, checkpoints and config.yaml
    resolve_spec: Callable[[JobSpec, str], JobSpec] | None = None
    # spec -> None: option checks that need the data (class-weights labels), run by the CLI before Prefect starts
    precheck: Callable[[JobSpec], None] | None = None

    @property
    def engines(self) -> tuple[str, ...]:
        return tuple(self.options.model_fields["engine"].annotation.__args__)

    def promotion_key(self, metric: str) -> str:
        return self.promotion.metrics[metric][0]


def epoch0_baseline(recipe: Recipe, history: list[dict]) -> dict[str, float]:
    """Baseline hook body for jobs that evaluate before training (`eval_before_training`): the model's own epoch-0
    scores from the run's history, by canonical promotion metric name."""
    row = next((h for h in history or [] if h.get("epoch") == 0), None)
    if row is None:
        raise LookupError("the run's history has no epoch-0 evaluation to take the baseline from")
    return {name: float(row[key]) for name, (key, _) in recipe.promotion.metrics.items() if key in row}


# Spellings users type for the canonical promotion metric names; a job's logged metric key is accepted too
# (eval_f1 -> f1).
SYNONYMS = {
    "acc": "accuracy", "masked_accuracy": "accuracy", "macro-f1": "f1", "macro_f1": "f1", "f1_macro": "f1",
    "ppl": "perplexity", "eval_perplexity": "perplexity",
    "micro-f1": "micro_f1", "f1_micro": "micro_f1", "subset-accuracy": "subset_accuracy",
    "exact_match": "subset_accuracy", "mse": "loss",
}


def promotion_of(job: str, options: dict | None = None) -> Promotion:
    """The promotion metrics a run of `job` allows (with its `options`: a kind's own subset and default)."""
    recipe = get(job)
    if recipe.for_options and options is not None:
        return recipe.for_options(options).get("promotion", recipe.promotion)
    return recipe.promotion


def baseline_name_of(job: str, options: dict | None = None) -> str:
    recipe = get(job)
    if recipe.for_options and options is not None:
        return recipe.for_options(options).get("baseline_name", recipe.baseline_name)
    return recipe.baseline_name


def resolve_metric(job: str, metric: str | None = None, options: dict | None = None) -> str:
    """Canonical promotion metric name of a job (its default when None); an unknown or unfitting name is a
    ConfigError. `tasks.promotion.resolve_metric` also takes a JobSpec. `options`:
    the run's job options, for jobs whose allowed metrics depend on them (classify's `problem`)."""
    p = promotion_of(job, options)
    if metric is None:
        return p.default
    raw = metric.strip().lower()
    by_key = {key: name for name, (key, _) in p.metrics.items()}
    name = by_key.get(raw) or SYNONYMS.get(raw, raw)
    if name not in p.metrics:
        raise ConfigError(
            f"promotion metric {metric!r} does not apply to {job}{_kind(options)} models: use one of {', '.join(p.metrics)} "
            f"(default {p.default})"
        )
    return name


def _kind(options: dict | None) -> str:
    problem = (options or {}).get("problem")
    return f" ({problem})" if problem else ""


_JOBS: dict[str, Recipe] = {}
_loaded = False


def register(recipe: Recipe) -> Recipe:
    """Adds (or replaces) a job. Called at import time by each recipe module."""
    if "engine" not in recipe.options.model_fields:
        raise TypeError(f"recipe {recipe.name!r}: its options need an `engine` field (Literal of engine names)")
    _JOBS[recipe.name] = recipe
    return recipe


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in BUILTIN:
        importlib.import_module(mod)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        importlib.import_module(ep.value.split(":")[0])


def all_jobs() -> dict[str, Recipe]:
    _load()
    return dict(_JOBS)


def get(name: str) -> Recipe:
    _load()
    try:
        return _JOBS[name]
    except KeyError:
        raise ConfigError(f"unknown job {name!r}: use one of {', '.join(sorted(_JOBS))}") from None


def for_hf_task(hf_task: str) -> Recipe | None:
    """The first job whose models are of this transformers task (for registry models without a job tag)."""
    return next((r for r in all_jobs().values() if r.hf_task == hf_task), None)
