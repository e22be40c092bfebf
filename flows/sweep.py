"""Hyper-parameter sweeps on Ray: `finetune sweep --config sweep.yaml`. A grid or random search over config fields;
each trial is a Prefect task run on prefect-ray's RayTaskRunner (a local Ray started for you, or `--ray-address`
for a cluster) with its own CPU/GPU resources, at most `max_concurrent` at a time. Each trial is a nested MLflow
run under one parent run, which holds the sweep's table (params, metric, seconds, status) as an MLflow artifact and
a Prefect table artifact. Only the best trial's model is registered and goes through the champion/challenger gate;
a failed trial is recorded (FAILED nested run, a row in the table) and the sweep goes on.

    job: classify
    base:                          # the job's config sections, as in `finetune classify --config`
      data: {train_samples: 2000}
    method: grid                   # grid (every combination, up to max_trials) or random (max_trials draws)
    parameters:
      train.learning_rate: [5.0e-5, 1.0e-4, 2.0e-4]
      train.warmup_ratio: {min: 0.0, max: 0.2}          # random only: uniform (log: true for log-uniform)
    metric: f1                     # default: the job's promotion metric
    max_trials: 3
    max_concurrent: 2
    resources: {cpus: 1, gpus: 0}  # per trial (Ray resources)
"""
from __future__ import annotations

import itertools
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flows.config import ConfigError, JobConfig, config_class


class Range(BaseModel):
    """A continuous range for random search."""

    model_config = ConfigDict(extra="forbid")
    min: float
    max: float
    log: bool = False


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cpus: float = Field(1, gt=0, description="CPUs Ray reserves for each trial.")
    gpus: float = Field(0, ge=0, description="GPUs Ray reserves for each trial (fractions share one GPU).")


class SweepConfig(BaseModel):
    """What to search, how, and what counts as best."""

    model_config = ConfigDict(extra="forbid")
    job: str = Field("classify", description="The job to sweep (a registered job: classify, mlm, ...).")
    base: dict[str, Any] = Field(default_factory=dict, description="The job's config, as in `finetune <job> --config`.")
    method: Literal["grid", "random"] = "grid"
    parameters: dict[str, list[Any] | Range] = Field(..., min_length=1,
                                                     description="Dotted config field -> values (or a range: random).")
    metric: str | None = Field(None, description="Promotion metric that ranks trials (default: the job's).")
    max_trials: int = Field(8, gt=0)
    max_concurrent: int = Field(2, gt=0, description="Trials running at the same time.")
    seed: int = Field(0, description="Seeds the random search's draws.")
    resources: Resources = Field(default_factory=Resources)
    ray_address: str | None = Field(None, description="A running Ray cluster (ray://host:10001 or auto); None: a "
                                                      "local Ray is started for the sweep.")
    promote: bool = Field(True, description="Register the best trial and run the champion/challenger gate.")


def load_sweep(path: str, overrides: dict | None = None) -> SweepConfig:
    """The sweep file, validated, with its trials' configs checked before anything starts."""
    from flows.config import read_yaml

    if not Path(path).is_file():
        raise ConfigError(f"sweep file {path!r} not found: pass an existing YAML file to --config")
    raw = read_yaml(path, "sweep file") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {path!r} must hold a mapping (job, base, method, parameters, ...)")
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError([f"sweep '{'.'.join(map(str, x['loc']))}': {x['msg']}" for x in e.errors()]) from None
    trial_configs(sweep)  # every trial's config is valid, or one error naming them
    return sweep


def _set(d: dict, dotted: str, value: Any) -> dict:
    node = d
    *parents, leaf = dotted.split(".")
    for k in parents:
        node = node.setdefault(k, {})
    node[leaf] = value
    return d


def trial_overrides(sweep: SweepConfig) -> list[dict[str, Any]]:
    """The trials, as {dotted field: value}: every combination in order (grid, first max_trials), or max_trials
    seeded draws (random: a value from each list, uniform or log-uniform from each range)."""
    names = list(sweep.parameters)
    if sweep.method == "grid":
        ranges = [n for n, v in sweep.parameters.items() if isinstance(v, Range)]
        if ranges:
            raise ConfigError(f"grid search needs lists of values, not ranges ({', '.join(ranges)}): "
                              "use method: random, or list the values")
        combos = itertools.product(*(sweep.parameters[n] for n in names))
        return [dict(zip(names, c)) for c in itertools.islice(combos, sweep.max_trials)]
    rng = random.Random(sweep.seed)

    def draw(v):
        if isinstance(v, Range):
            if v.log:
                return math.exp(rng.uniform(math.log(v.min), math.log(v.max)))
            return rng.uniform(v.min, v.max)
        return rng.choice(v)

    return [{n: draw(sweep.parameters[n]) for n in names} for _ in range(sweep.max_trials)]


def trial_configs(sweep: SweepConfig) -> list[tuple[dict, JobConfig]]:
    """(overrides, validated job config) per trial; bad fields or values are reported together."""
    import copy

    from flows.config import build_config

    cls = config_class(sweep.job)
    out, problems = [], []
    for i, over in enumerate(trial_overrides(sweep)):
        raw = copy.deepcopy(sweep.base)
        for k, v in over.items():
            _set(raw, k, v)
        try:
            out.append((over, build_config(cls, None, raw)))
        except ConfigError as e:
            problems += [f"trial {i} ({over}): {p}" for p in e.problems]
    if problems:
        raise ConfigError(sorted(set(problems)))
    from flows.promotion import resolve_metric

    resolve_metric(sweep.job, sweep.metric)
    return out


# --- one trial: a nested MLflow run ---------------------------------------------------------------------------
SHORT_NAMES = {"train.learning_rate": "lr", "train.warmup_ratio": "warmup", "train.batch_size": "bs",
               "train.weight_decay": "wd", "train.epochs": "epochs"}


def _short_value(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-3:
            mantissa, exp = f"{v:.3e}".split("e")  # 2e-4, not 0.0002
            return f"{float(mantissa):g}e{int(exp)}"
        return f"{v:.4g}"
    return str(v).rstrip("/").split("/")[-1]


def trial_name(index: int, overrides: dict[str, Any]) -> str:
    """`trial-2-lr=2e-4-warmup=0.1`: the trial's index and its parameters, short (names the Prefect task run and
    the nested MLflow run)."""
    parts = [f"{SHORT_NAMES.get(k, k.split('.')[-1])}={_short_value(v)}" for k, v in overrides.items()]
    return "-".join([f"trial-{index}", *parts])


def train_trial(cfg: JobConfig, parent_run_id: str, index: int, overrides: dict, data_path: str,
                tokenized_path: str, label_names: list[str] | None, name: str | None = None) -> dict:
    """Trains one trial as a nested run of the sweep's run and logs its model; returns its row (and what the
    registration of the best trial needs). A failure is recorded (FAILED run, error tag) and returned, not raised:
    one bad trial must not stop the sweep."""
    from tasks import liveness, output, tracking
    from tasks.disk import prune_run_dir

    from flows.promotion import error_line
    from tasks.training import train

    t0 = time.perf_counter()
    output.configure()  # a Ray worker is a fresh process: as quiet as a training run (no mlflow.transformers notices)
    tracking.configure()
    tags = {"mlflow.parentRunId": parent_run_id, "finetune.job": cfg.job, "finetune.sweep_trial": str(index)}
    run_id = tracking.start_run(cfg.experiment, name or trial_name(index, overrides), cfg.flat(), tags)
    row = {"trial": index, **overrides, "run_id": run_id}
    try:
        spec = cfg.spec(label_names)
        if cfg.recipe.resolve_spec:  # data-dependent options (class weights), as the training flow resolves them
            spec = cfg.recipe.resolve_spec(spec, data_path)
        run_dir = Path(cfg.train.output_dir) / cfg.job / run_id
        # a trial whose worker dies is closed by the next sweep; its dir records its store and run for `finetune gc`
        with liveness.heartbeat(run_id, tracking.set_tags, run_dir):
            result = train(spec, tokenized_path, str(run_dir), on_metrics=tracking.MetricsLogger(run_id))
            model_uri = tracking.log_model(run_id, result.model_dir, cfg.recipe.hf_task, [cfg.recipe.smoke_example])
        if not cfg.train.keep_checkpoints:  # logged: its checkpoints and model copy can go, as for any finished run
            prune_run_dir(run_dir)
        tracking.end_run(run_id, "FINISHED")
        return {**row, "status": "FINISHED", "seconds": round(time.perf_counter() - t0, 1),
                **{k: v for k, v in result.final.items() if k != "epoch"},
                "_model_uri": model_uri, "_final": result.final, "_history": result.history, "_probe": result.probe}
    except Exception as e:
        msg = error_line(e)
        tracking.set_tags(run_id, {"finetune.error": tracking.redact_uri(msg)[:5000]})
        tracking.end_run(run_id, "FAILED")
        return {**row, "status": "FAILED", "seconds": round(time.perf_counter() - t0, 1), "error": msg}


run_trial = task(train_trial, name="trial", cache_policy=NO_CACHE, persist_result=False,
                 task_run_name="{name}")


@flow(name="sweep-trials", flow_run_name="sweep-trials")
def trials_flow(trials: list[dict], parent_run_id: str, max_concurrent: int, cpus: float, gpus: float) -> list[dict]:
    """The fan-out, run with a RayTaskRunner: at most `max_concurrent` trials in flight, each with its Ray resources."""
    from prefect.futures import as_completed
    from prefect_ray.context import remote_options

    pending, rows = list(trials), []
    running: list = []
    with remote_options(num_cpus=cpus, num_gpus=gpus):
        while pending or running:
            while pending and len(running) < max_concurrent:
                t = pending.pop(0)
                running.append(run_trial.submit(t["cfg"], parent_run_id, t["index"], t["overrides"], t["data_path"],
                                                t["tokenized_path"], t["label_names"],
                                                trial_name(t["index"], t["overrides"])))
            f = next(as_completed(running))  # the first to finish frees a slot
            rows.append(f.result())
            running.remove(f)
    return sorted(rows, key=lambda r: r["trial"])


# --- the sweep ------------------------------------------------------------------------------------------------


# what tasks.output.configure sets for this process: the workers are as quiet (no bars, no load reports)
QUIET_ENV = ("TRANSFORMERS_VERBOSITY", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS",
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "TQDM_DISABLE", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK",
             "FINETUNE_VERBOSE")


def _ray_runner(sweep: SweepConfig):
    """prefect-ray's task runner; Ray workers get this process's Prefect API and MLflow store, so their task runs
    show in the same flow run and their MLflow runs land in the same store."""
    import os

    from tasks import output, tracking

    output.quiet_ray()  # a redirected log: no colour codes, no "[repeated Nx]" notes
    if sweep.ray_address is None:
        # Token authentication stays on: said explicitly, Ray does not warn that it turned it on by default. Ray
        # creates the token (~/.ray/auth_token) if missing; a cluster's nodes need the same one (docs/sweeps.md).
        os.environ.setdefault("RAY_AUTH_MODE", "token")

    from prefect.client.orchestration import get_client
    from prefect_ray import RayTaskRunner

    with get_client(sync_client=True) as c:
        api = str(c.api_url)
    env = {"PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": tracking.tracking_uri(),
           **{k: os.environ[k] for k in ("FINETUNE_CACHE_DIR", "HF_HUB_OFFLINE", "HF_HOME", "MLFLOW_TRACKING_USERNAME",
                                         "MLFLOW_TRACKING_PASSWORD", "PYTHONPATH", *QUIET_ENV) if k in os.environ}}
    init = {"runtime_env": {"env_vars": env}, "include_dashboard": False, "log_to_driver": True}
    if sweep.ray_address is None:
        init["num_cpus"] = max(os.cpu_count() or 1, int(math.ceil(sweep.resources.cpus)))
        if sweep.resources.gpus:
            init["num_gpus"] = int(math.ceil(sweep.resources.gpus))
    return RayTaskRunner(address=sweep.ray_address, init_kwargs=init)


def best_trial(rows: list[dict], key: str, higher: bool) -> dict | None:
    ok = [r for r in rows if r["status"] == "FINISHED" and isinstance(r.get(key), float) and math.isfinite(r[key])]
    return (max if higher else min)(ok, key=lambda r: r[key]) if ok else None


def run_sweep(sweep: SweepConfig) -> dict:
    """Prepare each trial's data once (content-addressed), start the parent MLflow run, fan the trials out on Ray,
    record the table, register the best trial and run its champion/challenger gate."""
    from tasks import jobs, liveness, tracking
    from tasks.common import run_logger
    from tasks.data import prepare_dataset

    from flows.common import flow_run_info
    from flows.lifecycle import register_and_promote
    from flows.monitoring import publish_table

    t_start = time.perf_counter()
    log = run_logger(__name__)
    tracking.check_tracking_server()
    pairs = trial_configs(sweep)
    base_cfg = pairs[0][1]
    recipe = base_cfg.recipe
    metric = jobs.resolve_metric(sweep.job, sweep.metric, base_cfg.spec().options)
    key, higher = recipe.promotion.metrics[metric]
    trials = []
    for i, (over, cfg) in enumerate(pairs):
        data = prepare_dataset(cfg.data, cfg.train.seed, getattr(cfg, "num_labels", None), getattr(cfg, "problem", None))
        spec = cfg.spec(data.label_names)
        trials.append({"index": i, "overrides": over, "cfg": cfg, "data_path": data.path,
                       "tokenized_path": recipe.tokenize(data.path, cfg.train.model, spec),
                       "label_names": data.label_names})
    name, fr_id = flow_run_info()
    if not name.startswith(f"sweep-{sweep.job}-"):  # not from sweep_flow (whose run has the unique name)
        name = sweep_run_name(sweep.job)
    space = {k: (v.model_dump() if isinstance(v, Range) else v) for k, v in sweep.parameters.items()}
    parent = tracking.start_run(
        base_cfg.experiment, name,
        {"sweep.method": sweep.method, "sweep.metric": metric, "sweep.max_trials": sweep.max_trials,
         "sweep.max_concurrent": sweep.max_concurrent, "sweep.parameters": json.dumps(space)},
        {"prefect.flow_run_id": str(fr_id or ""), "finetune.job": sweep.job, "finetune.sweep": "true"})
    log.info("sweep: %d trials (%s) on Ray, at most %d at a time, ranked by %s; MLflow parent run %s", len(trials),
             sweep.method, sweep.max_concurrent, key, parent)
    t0 = time.perf_counter()
    try:
        with liveness.heartbeat(parent, tracking.set_tags):  # a killed sweep's parent run is closed by the next sweep
            rows = trials_flow.with_options(task_runner=_ray_runner(sweep))(
                trials, parent, sweep.max_concurrent, sweep.resources.cpus, sweep.resources.gpus)
    except BaseException:
        tracking.end_run(parent, "FAILED")
        raise
    trials_wall = time.perf_counter() - t0
    table = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    best = best_trial(rows, key, higher)
    # the store stays bounded: only the trial that will be registered keeps its logged model
    from tasks.disk import delete_logged_model, human_bytes

    freed = sum(delete_logged_model(r["_model_uri"]) for r in rows
                if r["status"] == "FINISHED" and r.get("_model_uri") and r is not best)
    if freed:
        log.info("sweep: removed the logged models of the %d trial(s) that will not be registered (%s)",
                 sum(r["status"] == "FINISHED" for r in rows) - (best is not None), human_bytes(freed))
    out_dir = Path(base_cfg.train.output_dir) / "sweeps" / parent
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.json").write_text(json.dumps({"metric": key, "trials": table, "trials_seconds": trials_wall},
                                                   indent=2))
    tracking.log_artifacts(parent, [str(out_dir / "sweep.json")], "sweep")
    publish_table(table, f"sweep-{sweep.job}", f"Sweep of {sweep.job}: {len(rows)} trials ranked by {key}")
    summary = {"parent_run_id": parent, "name": name, "metric": key, "trials": table,
               "trials_seconds": round(trials_wall, 1), "best_trial": best["trial"] if best else None,
               "failed": sum(r["status"] != "FINISHED" for r in rows)}
    if best is None:
        tracking.end_run(parent, "FAILED")
        raise RuntimeError(f"every trial of the sweep failed; see MLflow run {parent}")
    tracking.MetricsLogger(parent)({f"best_{key}": best[key], "trials_failed": summary["failed"],
                                    "sweep_trials_seconds": trials_wall}, 0)
    tracking.set_tags(parent, {"finetune.best_trial": str(best["trial"]), "finetune.best_run_id": best["run_id"]})
    if sweep.promote:
        cfg = pairs[best["trial"]][1]
        t = trials[best["trial"]]
        outcome = register_and_promote(cfg, best["run_id"], best["_model_uri"], best["_final"], t["data_path"],
                                       t["tokenized_path"], best["_history"], best["_probe"])
        summary.update(version=outcome["version"], aliases=outcome["aliases"], decision=outcome["decision"])
        tracking.set_tags(parent, {"registered_version": outcome["version"]})
    # the whole sweep (data, Ray start, trials, registration): what the summary reports
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    tracking.MetricsLogger(parent)({"sweep_seconds": summary["wall_seconds"]}, 0)
    tracking.end_run(parent, "FINISHED")
    return summary


def sweep_run_name(job: str | None = None) -> str:
    """`sweep-<job>-<YYYYmmdd-HHMMSS>-<4 hex>`: unique and readable; names the flow run and its MLflow parent run
    (the job from the flow run's parameter when not given)."""
    from flows.common import unique_run_name

    if job is None:
        from prefect.runtime import flow_run

        sweep = flow_run.parameters.get("sweep")
        job = sweep.get("job", "classify") if isinstance(sweep, dict) else getattr(sweep, "job", "classify")
    return unique_run_name(f"sweep-{job}")


@flow(name="sweep", flow_run_name=sweep_run_name)
def sweep_flow(sweep: SweepConfig) -> dict:
    """A hyper-parameter sweep: trials on Ray, the best one registered and gated (see module docstring)."""
    return run_sweep(sweep)
