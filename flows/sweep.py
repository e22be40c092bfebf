"""Hyper-parameter sweeps on Ray: `finetune sweep --config sweep.yaml`. A grid, random or model-based (Optuna's
TPE, ...) search over config fields, with pruning of trials that fall behind; each trial is a Prefect task run on
prefect-ray's RayTaskRunner (a local Ray started for you, or `--ray-address` for a cluster) with its own CPU/GPU
resources, at most `max_concurrent` at a time. Each trial is a nested MLflow
run under one parent run, which holds the sweep's table (params, metric, seconds, status) as an MLflow artifact and
a Prefect table artifact. Only the best trial's model is registered and goes through the champion/challenger gate;
a failed trial is recorded (FAILED nested run, a row in the table) and the sweep goes on; a pruned one is a KILLED
nested run (tags `pruned.*`) and a PRUNED row. Every sweep is an Optuna study in the RDB storage beside the tracking
data (tasks/search.py): the driver asks for each trial and tells its result, and `resume` adds trials to the last
study of the same search without training a finished trial again.

    job: classify
    base:                          # the job's config sections, as in `finetune classify --config`
      data: {train_samples: 2000}
    method: grid                   # grid (every combination, up to max_trials), random (max_trials draws), or an
                                   # Optuna sampler: tpe, gp, cmaes, qmc (each trial chosen from the results so far)
    pruner: none                   # none | median | hyperband | asha: stop a trial that falls behind, per epoch
    resume: false                  # add to the last study of this search (finished trials are never trained again)
    parameters:
      train.learning_rate: [5.0e-5, 1.0e-4, 2.0e-4]
      train.warmup_ratio: {min: 0.0, max: 0.2}          # not grid: uniform (log: true for log-uniform)
    metric: f1                     # default: the job's promotion metric
    max_trials: 3
    max_concurrent: 2
    resources: {cpus: 1, gpus: 0}  # per trial (Ray resources)
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import random
import time
import typing
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.futures import as_completed
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flows.common import flow_run_info, run_dir_for, unique_run_name
from flows.config import ConfigError, JobConfig, build_config, config_class, read_yaml
from flows.lifecycle import register_and_promote, train_log_publish
from flows.monitoring import publish_table
from tasks import jobs, liveness, output, search, tracking
from tasks.common import run_logger
from tasks.data import prepare_dataset
from tasks.disk import delete_logged_model, human_bytes, prune_run_dir
from tasks.promotion import error_line
from tasks.search import PRUNERS, SAMPLERS, TrialPruned


class Range(BaseModel):
    """A range for random or model-based search: uniform, or log-uniform; integers for a field that holds one."""

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
    method: Literal[("grid", "random", *SAMPLERS)] = Field(
        "grid", description="grid: every combination in order; random: seeded draws; tpe (gp, cmaes, qmc): Optuna's "
                            "sampler, each trial chosen from the results so far.")
    parameters: dict[str, list[Any] | Range] = Field(..., min_length=1,
                                                     description="Dotted config field -> values (or a range: not grid).")
    pruner: Literal[PRUNERS] = Field("none", description="Stop trials that fall behind after an epoch's evaluation: "
                                                        "none, median, hyperband or asha (Optuna's pruners).")
    resume: bool = Field(False, description="Add trials to the last study of this search (same job, base, "
                                            "parameters, metric, method); finished trials are not trained again.")
    startup_trials: int | None = Field(None, gt=0, description="Trials before the sampler models the results and the "
                                                               "median pruner prunes (default: max_trials / 4, 2..10).")
    metric: str | None = Field(None, description="Promotion metric that ranks trials (default: the job's).")
    max_trials: int = Field(8, gt=0)
    max_concurrent: int = Field(2, gt=0, description="Trials running at the same time.")
    seed: int = Field(0, description="Seeds the random search's draws and the Optuna sampler.")
    resources: Resources = Field(default_factory=Resources)
    ray_address: str | None = Field(None, description="A running Ray cluster (ray://host:10001 or auto); None: a "
                                                      "local Ray is started for the sweep.")
    promote: bool = Field(True, description="Register the best trial and run the champion/challenger gate.")


def load_sweep(path: str, overrides: dict | None = None) -> SweepConfig:
    """The sweep file, validated, with its trials' configs checked before anything starts."""
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


def planned(sweep: SweepConfig) -> bool:
    """grid and random fix their trials up front; an Optuna sampler chooses each from the results so far."""
    return sweep.method in ("grid", "random")


def int_fields(sweep: SweepConfig) -> set[str]:
    """The swept fields whose config type is an integer (a range over one is an integer range)."""
    out = set()
    for name in sweep.parameters:
        node: Any = config_class(sweep.job)
        for part in name.split("."):
            field = getattr(node, "model_fields", {}).get(part)
            if field is None:
                node = None
                break
            node = field.annotation
            args = [a for a in typing.get_args(node) if a is not type(None)]
            if typing.get_origin(node) is not None and len(args) == 1:
                node = args[0]  # int | None -> int
        if node is int:
            out.add(name)
    return out


def probe_overrides(sweep: SweepConfig) -> list[dict[str, Any]]:
    """For a model-based search, whose trials are not known up front: points that check every value it can take
    (each listed value and each range's ends, one parameter at a time, the others at their first value or min)."""
    ints = int_fields(sweep)

    def ends(name, v):
        if not isinstance(v, Range):
            return list(v)
        lo, hi = (math.ceil(v.min), math.floor(v.max)) if name in ints else (v.min, v.max)
        return [lo, hi]

    first = {n: ends(n, v)[0] for n, v in sweep.parameters.items()}
    points = [first]
    for n, v in sweep.parameters.items():
        points += [{**first, n: x} for x in ends(n, v)[1:]]
    return points


def trial_config(sweep: SweepConfig, overrides: dict[str, Any]) -> JobConfig:
    """One trial's validated job config: the sweep's base with `overrides` set."""
    raw = copy.deepcopy(sweep.base)
    for k, v in overrides.items():
        _set(raw, k, v)
    return build_config(config_class(sweep.job), None, raw)


def trial_configs(sweep: SweepConfig) -> list[tuple[dict, JobConfig]]:
    """(overrides, validated job config) per trial (a model-based search: per probe point, see probe_overrides);
    bad fields or values are reported together."""
    out, problems = [], []
    for i, over in enumerate(trial_overrides(sweep) if planned(sweep) else probe_overrides(sweep)):
        try:
            cfg = trial_config(sweep, over)
        except ConfigError as e:
            problems += [f"trial {i} ({over}): {p}" for p in e.problems]
            continue
        if sweep.pruner != "none" and (cfg.train.nproc_per_node > 1 or cfg.train.nnodes > 1):
            problems.append(f"pruner {sweep.pruner} needs single-process trials (nproc_per_node 1, nnodes 1): the "
                            "pruning hook does not reach torchrun's processes; use pruner: none")
        out.append((over, cfg))
    if problems:
        raise ConfigError(sorted(set(problems)))
    if not planned(sweep):
        search.make_sampler(sweep.method, sweep.seed, 1)  # a sampler that needs a missing package: said now
        search.distributions(space(sweep), int_fields(sweep))
    jobs.resolve_metric(sweep.job, sweep.metric)
    return out


def space(sweep: SweepConfig) -> dict[str, Any]:
    """The parameters as plain values (ranges as dicts): the search space's record and Optuna's input."""
    return {k: (v.model_dump() if isinstance(v, Range) else v) for k, v in sweep.parameters.items()}


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
                tokenized_path: str, label_names: list[str] | None, name: str | None = None,
                on_evaluation=None) -> dict:
    """Trains one trial as a nested run of the sweep's run, by the training flow's own path (train -> log ->
    retention, `flows.lifecycle.train_log_publish`) without publishing: only the best trial is registered, by the
    sweep. Returns its row (and what the registration of the best trial needs). A failure is recorded (FAILED run,
    error tag) and returned, not raised: one bad trial must not stop the sweep. `on_evaluation` (the pruner's hook,
    tasks.search.PruningReporter) may stop it after an epoch: a KILLED run with `pruned.*` tags, no model, no
    checkpoint kept, a PRUNED row."""
    t0 = time.perf_counter()
    output.configure()  # a Ray worker is a fresh process: as quiet as a training run (no mlflow.transformers notices)
    tracking.configure()
    tags = {"mlflow.parentRunId": parent_run_id, "finetune.job": cfg.job, "finetune.sweep_trial": str(index)}
    run_id = tracking.start_run(cfg.experiment, name or trial_name(index, overrides), cfg.flat(), tags)
    row = {"trial": index, **overrides, "run_id": run_id}
    try:
        run_dir = run_dir_for(cfg, run_id)
        spec = cfg.spec(label_names)
        if cfg.recipe.resolve_spec:  # data-dependent options (class weights), as the training flow resolves them
            spec = cfg.recipe.resolve_spec(spec, data_path)
        # a trial whose worker dies is closed by the next sweep; its dir records its store and run for `finetune gc`
        with liveness.heartbeat(run_id, tracking.set_tags, run_dir):
            done = train_log_publish(cfg, spec, run_id, run_dir, tokenized_path, data_path,
                                     publish=False, progress=False, on_evaluation=on_evaluation)
        tracking.end_run(run_id, "FINISHED")
        result = done.result
        return {**row, "status": "FINISHED", "seconds": round(time.perf_counter() - t0, 1),
                "epochs_trained": sum(r["epoch"] > 0 for r in result.history),
                **{k: v for k, v in result.final.items() if k != "epoch"},
                "_model_uri": done.model_uri, "_final": result.final, "_history": result.history,
                "_probe": result.probe}
    except TrialPruned as e:  # the metrics up to this epoch are logged; nothing of it is kept or registered
        tracking.set_tags(run_id, {"pruned.at_epoch": str(e.epoch), "pruned.reason": e.reason,
                                   "pruned.metric": e.metric, f"pruned.{e.metric}": f"{e.value:.6g}"})
        tracking.end_run(run_id, "KILLED")
        prune_run_dir(run_dir)
        return {**row, "status": "PRUNED", "seconds": round(time.perf_counter() - t0, 1), "epochs_trained": e.epoch,
                **e.metrics, "pruned_at_epoch": e.epoch}
    except Exception as e:
        msg = error_line(e)
        tracking.set_tags(run_id, {"finetune.error": tracking.redact_uri(msg)[:5000]})
        tracking.end_run(run_id, "FAILED")
        return {**row, "status": "FAILED", "seconds": round(time.perf_counter() - t0, 1), "error": msg}


run_trial = task(train_trial, name="trial", cache_policy=NO_CACHE, persist_result=False,
                 task_run_name="{name}")


def prepare_trial(sweep: SweepConfig, index: int, overrides: dict[str, Any]) -> dict:
    """A trial's config, prepared data and tokenized data (content-addressed: a second call finds them)."""
    cfg = trial_config(sweep, overrides)
    data = prepare_dataset(cfg.data, cfg.train.seed, getattr(cfg, "num_labels", None), getattr(cfg, "problem", None))
    spec = cfg.spec(data.label_names)
    return {"index": index, "overrides": overrides, "cfg": cfg, "data_path": data.path,
            "tokenized_path": cfg.recipe.tokenize(data.path, cfg.train.model, spec), "label_names": data.label_names}


@flow(name="sweep-trials", flow_run_name="sweep-trials")
def trials_flow(sweep: SweepConfig, parent_run_id: str, study_name: str, metric_key: str,
                plan: list[dict] | None = None) -> list[dict]:
    """The ask/tell loop, run with a RayTaskRunner: at most `max_concurrent` trials in flight, each with its Ray
    resources; a freed slot asks the study for the next trial (grid/random: the next of `plan`, enqueued; an
    Optuna sampler: chosen from every trial told so far), and each trial's end is told to the study. A proposal
    that repeats a finished or running trial is not trained (closed as FAIL, marked as a duplicate) and an untried
    point, drawn at random (seeded), runs in its place."""
    import optuna  # a sweep's own dependency (the ray extra): loaded when a sweep runs
    from prefect_ray.context import remote_options  # imports ray: only when a sweep runs

    log = run_logger(__name__)
    url = search.storage_url()
    startup = sweep.startup_trials or search.default_startup_trials(sweep.max_trials)
    sampler = (optuna.samplers.RandomSampler(seed=sweep.seed) if planned(sweep)
               else search.make_sampler(sweep.method, sweep.seed, startup, sweep.max_concurrent))
    study = optuna.load_study(study_name=study_name, storage=search.open_storage(url), sampler=sampler,
                              pruner=search.make_pruner(sweep.pruner, startup))
    params = space(sweep)
    dists = search.distributions(params, int_fields(sweep))
    queue = list(plan) if plan is not None else None
    rows: list[dict] = []
    running: dict = {}  # future -> trial number
    started = 0

    def ask():
        if queue is not None:
            if not queue:
                return None
            study.enqueue_trial(search.encode(params, queue.pop(0)))
            return study.ask(dists)
        trial = study.ask(dists)
        other = search.duplicate_of(study, trial)
        if other is None:
            return trial
        search.reject_duplicate(study, trial, other)
        from optuna.trial import TrialState

        tried = [t.params for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                            TrialState.RUNNING))]
        point = search.untried_point(dists, tried, sweep.seed + trial.number)
        if point is None:
            log.info("sweep: every point of the search space has been tried")
            return None
        log.info("sweep: the sampler proposed trial %d's parameters again: an untried point instead", other)
        study.enqueue_trial(point)
        return study.ask(dists)

    with remote_options(num_cpus=sweep.resources.cpus, num_gpus=sweep.resources.gpus):
        while True:
            while started < sweep.max_trials and len(running) < sweep.max_concurrent:
                trial = ask()
                if trial is None:
                    started = sweep.max_trials  # nothing left to ask
                    break
                started += 1
                overrides = search.decode(params, trial.params)
                try:
                    t = prepare_trial(sweep, trial.number, overrides)
                except ConfigError as e:  # a point of a model-based search whose config is not valid
                    rows.append({"trial": trial.number, **overrides, "run_id": None, "status": "FAILED",
                                 "seconds": 0.0, "error": "; ".join(e.problems)})
                    search.tell(study, trial.number, "FAILED", None)
                    continue
                hook = (search.PruningReporter(url, study.study_name, trial._trial_id, sweep.pruner, startup,
                                               metric_key) if sweep.pruner != "none" else None)
                f = run_trial.submit(t["cfg"], parent_run_id, trial.number, overrides, t["data_path"],
                                     t["tokenized_path"], t["label_names"], trial_name(trial.number, overrides),
                                     hook)
                running[f] = trial.number
            if not running:
                break
            f = next(as_completed(list(running)))  # the first to finish frees a slot
            running.pop(f)
            row = f.result()
            search.tell(study, row["trial"], row["status"], row.get(metric_key))
            rows.append(row)
    return sorted(rows, key=lambda r: r["trial"])


# --- the sweep ------------------------------------------------------------------------------------------------


# what tasks.output.configure sets for this process: the workers are as quiet (no bars, no load reports)
QUIET_ENV = ("TRANSFORMERS_VERBOSITY", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS",
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "TQDM_DISABLE", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK",
             "FINETUNE_VERBOSE")


def _ray_runner(sweep: SweepConfig):
    """prefect-ray's task runner; Ray workers get this process's Prefect API and MLflow store, so their task runs
    show in the same flow run and their MLflow runs land in the same store."""
    output.quiet_ray()  # a redirected log: no colour codes, no "[repeated Nx]" notes
    if sweep.ray_address is None:
        # Token authentication stays on: said explicitly, Ray does not warn that it turned it on by default. Ray
        # creates the token (~/.ray/auth_token) if missing; a cluster's nodes need the same one (docs/sweeps.md).
        os.environ.setdefault("RAY_AUTH_MODE", "token")

    from prefect_ray import RayTaskRunner  # imports ray: only when a sweep starts

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


def remaining_plan(sweep: SweepConfig, done: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """grid/random: the next `max_trials` of the sweep's trials that are not among `done` (the Optuna params of the
    study's finished trials): a resumed grid goes on where it stopped, a resumed random search draws on."""
    params = space(sweep)
    longer = trial_overrides(sweep.model_copy(update={"max_trials": sweep.max_trials + len(done)}))
    return [o for o in longer if search.encode(params, o) not in done][:sweep.max_trials]


def run_sweep(sweep: SweepConfig) -> dict:
    """Open (or resume) the sweep's study, start the parent MLflow run, run the ask/tell loop with the trials on
    Ray, record the table, register the best trial and run its champion/challenger gate."""
    t_start = time.perf_counter()
    log = run_logger(__name__)
    tracking.check_tracking_server()
    pairs = trial_configs(sweep)
    base_cfg = pairs[0][1]
    recipe = base_cfg.recipe
    metric = jobs.resolve_metric(sweep.job, sweep.metric, base_cfg.spec().options)
    key, higher = recipe.promotion.metrics[metric]
    name, fr_id = flow_run_info()
    if not name.startswith(f"sweep-{sweep.job}-"):  # not from sweep_flow (whose run has the unique name)
        name = sweep_run_name(sweep.job)
    # --- the study: new, or the last one of the same search (resume)
    url = search.storage_url()
    storage = search.open_storage(url)
    family = search.study_family({"job": sweep.job, "base": sweep.base, "parameters": space(sweep), "metric": metric,
                                  "method": sweep.method})
    study = search.open_study(storage, family, f"{family}-{name.removeprefix(f'sweep-{sweep.job}-')}", sweep.resume,
                              higher, None, None)
    interrupted = search.close_interrupted(study)
    done = search.finished(study)
    if sweep.resume:
        log.info("sweep: resuming study %s (%s): %d finished trial(s) kept%s", study.study_name, search.redact(url),
                 len(done), f", {interrupted} interrupted one(s) closed as FAIL" if interrupted else "")
    plan = remaining_plan(sweep, [t.params for t in done]) if planned(sweep) else None
    parent = tracking.start_run(
        base_cfg.experiment, name,
        {"sweep.method": sweep.method, "sweep.metric": metric, "sweep.max_trials": sweep.max_trials,
         "sweep.max_concurrent": sweep.max_concurrent, "sweep.parameters": json.dumps(space(sweep)),
         "sweep.pruner": sweep.pruner, "sweep.resume": sweep.resume, "sweep.study": study.study_name,
         "sweep.storage": search.redact(url)},
        {"prefect.flow_run_id": str(fr_id or ""), "finetune.job": sweep.job, "finetune.sweep": "true",
         "finetune.study": study.study_name})
    log.info("sweep: %s trials (%s%s) on Ray, at most %d at a time, ranked by %s; study %s; MLflow parent run %s",
             len(plan) if plan is not None else f"up to {sweep.max_trials}", sweep.method,
             f", pruner {sweep.pruner}" if sweep.pruner != "none" else "", sweep.max_concurrent, key,
             study.study_name, parent)
    t0 = time.perf_counter()
    try:
        with liveness.heartbeat(parent, tracking.set_tags):  # a killed sweep's parent run is closed by the next sweep
            rows = trials_flow.with_options(task_runner=_ray_runner(sweep))(sweep, parent, study.study_name, key, plan)
    except BaseException:
        tracking.end_run(parent, "FAILED")
        raise
    trials_wall = time.perf_counter() - t0
    table = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    best = best_trial(rows, key, higher)
    # the store stays bounded: only the trial that will be registered keeps its logged model
    freed = sum(delete_logged_model(r["_model_uri"]) for r in rows
                if r["status"] == "FINISHED" and r.get("_model_uri") and r is not best)
    if freed:
        log.info("sweep: removed the logged models of the %d trial(s) that will not be registered (%s)",
                 sum(r["status"] == "FINISHED" for r in rows) - (best is not None), human_bytes(freed))
    out_dir = Path(base_cfg.train.output_dir) / "sweeps" / parent
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.json").write_text(json.dumps({"metric": key, "study": study.study_name, "trials": table,
                                                    "trials_seconds": trials_wall}, indent=2))
    tracking.log_artifacts(parent, [str(out_dir / "sweep.json")], "sweep")
    publish_table(table, f"sweep-{sweep.job}", f"Sweep of {sweep.job}: {len(rows)} trials ranked by {key}")
    summary = {"parent_run_id": parent, "name": name, "metric": key, "trials": table, "study": study.study_name,
               "trials_seconds": round(trials_wall, 1), "best_trial": best["trial"] if best else None,
               "failed": sum(r["status"] == "FAILED" for r in rows),
               "pruned": sum(r["status"] == "PRUNED" for r in rows),
               "epochs_trained": sum(r.get("epochs_trained", 0) for r in rows),
               "study_finished_trials": len(search.finished(study))}
    if not rows and sweep.resume:  # a resumed grid with no combination left
        log.info("sweep: study %s has no trial left to run", study.study_name)
        summary["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        tracking.end_run(parent, "FINISHED")
        return summary
    if best is None:
        tracking.end_run(parent, "FAILED")
        raise RuntimeError(f"no trial of the sweep finished; see MLflow run {parent}")
    tracking.MetricsLogger(parent)({f"best_{key}": best[key], "trials_failed": summary["failed"],
                                    "trials_pruned": summary["pruned"], "trial_epochs": summary["epochs_trained"],
                                    "sweep_trials_seconds": trials_wall}, 0)
    tracking.set_tags(parent, {"finetune.best_trial": str(best["trial"]), "finetune.best_run_id": best["run_id"]})
    if sweep.promote:
        t = prepare_trial(sweep, best["trial"], {k: best[k] for k in sweep.parameters})
        outcome = register_and_promote(t["cfg"], best["run_id"], best["_model_uri"], best["_final"], t["data_path"],
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
    if job is None:
        sweep = flow_run.parameters.get("sweep")
        job = sweep.get("job", "classify") if isinstance(sweep, dict) else getattr(sweep, "job", "classify")
    return unique_run_name(f"sweep-{job}")


@flow(name="sweep", flow_run_name=sweep_run_name)
def sweep_flow(sweep: SweepConfig) -> dict:
    """A hyper-parameter sweep: trials on Ray, the best one registered and gated (see module docstring)."""
    return run_sweep(sweep)
