"""One typed config per flow. The same object is the Prefect flow parameter (validated, rendered as a form in
the UI), the YAML file (`--config`) and the CLI flags (precedence: defaults < YAML < flags)."""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

# The ground floor (tasks/) owns the sections its functions take; the job configs compose them.
from tasks.common import EMBEDDED_MODEL, PROJECT_ROOT, ConfigError  # noqa: F401  (re-exported)
from tasks.data import EMBEDDED_DATASET, DataConfig  # noqa: F401
from tasks.training import LoraConfig, TrainConfig  # noqa: F401
from tasks import jobs
from tasks.jobs import JobSpec, Recipe


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experiment: str | None = Field(None, description="MLflow experiment (default: finetune-<job>).")
    registered_model: str | None = Field(None, description="Registry name for the model (default per job).")
    run_name: str | None = Field(None, description="MLflow run name (default: the Prefect flow run name).")
    promote: bool = Field(True, description="Run champion/challenger promotion after registering.")
    promotion_metric: str | None = Field(
        None, description="Metric that decides promotion: accuracy, f1, loss, perplexity (default per job)."
    )
    promotion_margin: float = Field(0.0, ge=0.0, description="Challenger must beat champion by more than this.")


class JobConfig(BaseModel):
    """Fields every job shares: the data, train, tracking and lora sections and the adapter choice. A job's
    config adds its own top-level fields (its recipe's options). `description` and `example` feed `--help`."""

    model_config = ConfigDict(extra="forbid")
    description: ClassVar[str] = ""
    example: ClassVar[str] = ""

    job: str = "job"
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    peft: Literal["none", "lora"] = Field(
        "none", description="none: fine-tune every weight; lora: train LoRA adapters only (the `lora` section)."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    warm_start: str | None = Field(
        None, pattern=r"^([A-Za-z][A-Za-z0-9_-]*|[0-9]+)$",
        description="Start from this job's own registered model instead of train.model: champion, challenger (any "
        "alias) or a version number. Its labels must match the data's (same names, same order). With no such alias "
        "yet (a first run) training starts from train.model and says so.")

    def flat(self) -> dict[str, Any]:
        """Flattened `section.key` view, logged as MLflow params so runs compare side by side."""
        out: dict[str, Any] = {"job": self.job}
        for name, value in self.model_dump(exclude={"job"}).items():
            if isinstance(getattr(self, name), BaseModel):
                out.update({f"{name}.{k}": v for k, v in value.items()})
            else:
                out[name] = value
        return out

    @property
    def recipe(self) -> Recipe:
        return jobs.get(self.job)

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or f"finetune-{self.job}"

    @property
    def registered_model(self) -> str:
        return self.tracking.registered_model or self.recipe.registered_model

    def spec(self, label_names: list[str] | None = None) -> JobSpec:
        """The ground floor's view of this config (tasks never see the flow's config class)."""
        fields = self.recipe.options.model_fields
        return JobSpec(job=self.job, data=self.data, train=self.train, peft=self.peft, lora=self.lora,
                       options={k: getattr(self, k) for k in fields}, label_names=label_names,
                       promotion_metric=self.tracking.promotion_metric)


def _job_defaults(recipe: Recipe):
    """Per-job defaults filled in before validation (explicit values, from YAML or flags, win): sample counts for
    the embedded data, the learning rate, and the job's data and train defaults."""

    def fill(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        v = dict(v)
        data, train = dict(v.get("data") or {}), dict(v.get("train") or {})
        if (data.get("dataset") or EMBEDDED_DATASET).startswith(EMBEDDED_DATASET):
            for k, val in recipe.embedded_defaults.items():
                data.setdefault(k, val)
        for k, val in recipe.data_defaults.items():
            data.setdefault(k, val)
        for k, val in recipe.train_defaults.items():
            train.setdefault(k, val)
        lora = v.get("peft") == "lora"
        train.setdefault("learning_rate", recipe.lora_learning_rate if lora else recipe.learning_rate)
        v["data"], v["train"] = data, train
        return v

    return fill


def _job_options(recipe: Recipe):
    """The job's options validated by its recipe's own model (its validators too: e.g. classify's class weights
    against the problem), normalised values written back. Only the fields are copied into the config class."""

    def check(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        names = [k for k in recipe.options.model_fields if k in v]
        if not names:
            return v
        opts = recipe.options.model_validate({k: v[k] for k in recipe.options.model_fields if k in v})
        return {**v, **{k: getattr(opts, k) for k in names}}

    return check


@functools.lru_cache(maxsize=None)
def config_class(job: str) -> type[JobConfig]:
    """The typed config of a job: the shared sections plus its recipe's options, with the job's defaults. Also
    the Prefect flow parameter (validated, rendered as a form) and the source of the CLI flags."""
    recipe = jobs.get(job)
    name = recipe.config_name or "".join(w.capitalize() for w in re.split(r"[^A-Za-z0-9]+", job)) + "Config"
    options = {k: (f.annotation, f) for k, f in recipe.options.model_fields.items()}
    cls = create_model(
        name,
        __base__=JobConfig,
        __module__=__name__,
        __doc__=recipe.description,
        __validators__={"_defaults": model_validator(mode="before")(classmethod(_job_defaults(recipe))),
                        "_options": model_validator(mode="before")(classmethod(_job_options(recipe)))},
        job=(Literal[job], job),  # type: ignore[valid-type]
        **options,
    )
    cls.description, cls.example = recipe.description, recipe.example
    return cls


def job_configs() -> dict[str, type[JobConfig]]:
    """The config class of every registered job, by job name (the `finetune` subcommands)."""
    return {name: config_class(name) for name in jobs.all_jobs()}


# The built-in jobs' configs under their familiar names (users' scripts import them).
ClassifyConfig = config_class("classify")
MLMConfig = config_class("mlm")


def config_from_params(params: dict[str, str]) -> JobConfig:
    """Rebuilds a run's config from its logged MLflow params (`section.key` strings)."""
    def val(s: str) -> Any:
        return None if s == "None" else yaml.safe_load(s)

    def text_field(field) -> bool:  # a str field keeps the logged string (a separator '|', a JSON object)
        return field.annotation in (str, str | None)

    job = params.get("job", "classify")
    cls = config_class(job)
    raw: dict[str, Any] = {}
    for k, v in params.items():
        section, _, key = k.partition(".")
        if key and section in cls.model_fields:
            sub = cls.model_fields[section].annotation
            f = sub.model_fields.get(key) if isinstance(sub, type) and issubclass(sub, BaseModel) else None
            raw.setdefault(section, {})[key] = v if f is not None and text_field(f) and v != "None" else val(v)
        elif not key and k in cls.model_fields and k != "job":
            raw[k] = v if text_field(cls.model_fields[k]) and v != "None" else val(v)
    for section, fields in list(raw.items()):
        sub = cls.model_fields[section].annotation
        if isinstance(fields, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            raw[section] = {k: v for k, v in fields.items() if k in sub.model_fields}
    return cls.model_validate(raw)


def _deep_update(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path, what: str = "YAML file") -> Any:
    """A YAML file's content; unreadable or invalid YAML is one ConfigError naming the file, line and column."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{what} {str(path)!r} cannot be read ({e.strerror}): check the path and its permissions") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML{where}: {problem}; fix the YAML syntax "
                          "(e.g. a missing closing bracket or quote, tabs used for indentation)") from None


def build_config(cls: type[JobConfig], yaml_path: str | None = None, overrides: dict | None = None) -> JobConfig:
    """defaults < YAML < overrides (nested dicts). Unknown keys and bad values are reported together."""
    raw: dict = {}
    if yaml_path:
        p = Path(yaml_path)
        if not p.is_file():
            raise ConfigError(f"config file {yaml_path!r} not found: pass an existing YAML file to --config")
        loaded = read_yaml(p, "config file") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {yaml_path!r} must hold a mapping (sections data/train/tracking)")
        raw = loaded
    raw = _deep_update(raw, overrides or {})
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown config key '{loc}': remove it or fix its spelling")
            else:
                problems.append(f"config '{loc}': {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(problems) from None
