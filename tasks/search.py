"""Model-based search and pruning for sweeps, on Optuna: the study (sampler by name, seeded; pruner by name; RDB
storage beside the tracking data), the search space from a sweep's `parameters`, and the pruning hook a trial
passes to `tasks.training.train` as `on_evaluation`. Plain functions, no Prefect: flows/sweep.py drives them
(ask/tell), and a trial on a Ray worker reaches its study through the storage alone (by study name and trial id).

Storage: the sqlite store's folder holds `optuna.db` beside `mlflow.db` (a file of its own: Optuna and MLflow both
keep an `alembic_version` table); a PostgreSQL tracking database holds the study in a schema `optuna` of the same
database. A tracking *server* does not say where it keeps its data: `MLFLOW_BACKEND_STORE_URI` (what
mlflow/server.sh reads) is used when set, else `FINETUNE_SWEEP_STORAGE`, else the local sqlite store's folder."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from tasks import tracking
from tasks.common import ConfigError
from tasks.tracking import _prepare_sqlite, redact_uri
from tasks.training.config import StopTraining

log = logging.getLogger(__name__)

# method name -> Optuna sampler class (model-based or quasi-random); grid and random are the sweep's own plans
SAMPLERS = {"tpe": "TPESampler", "gp": "GPSampler", "cmaes": "CmaEsSampler", "qmc": "QMCSampler"}
PRUNERS = ("none", "median", "hyperband", "asha")
STORAGE_ENV = "FINETUNE_SWEEP_STORAGE"
PG_SCHEMA = "optuna"
PRIMITIVE = (type(None), bool, int, float, str)


class TrialPruned(StopTraining):
    """Raised by the pruning hook after an evaluation: the trial stops at once (no model, no checkpoint kept)."""

    def __init__(self, epoch: int, metric: str, value: float, reason: str, metrics: dict | None = None):
        super().__init__(reason)
        self.epoch, self.metric, self.value, self.reason = epoch, metric, value, reason
        self.metrics = dict(metrics or {metric: value})  # the evaluation it was pruned after


# --- storage -----------------------------------------------------------------------------------------------------

def storage_url(tracking_uri: str | None = None) -> str:
    """Where studies are kept (see the module docstring): `FINETUNE_SWEEP_STORAGE` when set, else derived from the
    tracking store (the server's `MLFLOW_BACKEND_STORE_URI` for an http(s) tracking URI)."""
    if os.environ.get(STORAGE_ENV):
        return os.environ[STORAGE_ENV]
    uri = tracking_uri or tracking.tracking_uri()
    if uri.startswith(("http://", "https://")) and os.environ.get("MLFLOW_BACKEND_STORE_URI"):
        uri = os.environ["MLFLOW_BACKEND_STORE_URI"]
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking._sqlite_path(uri)).resolve().parent / 'optuna.db'}"
    if uri.startswith(("postgresql://", "postgresql+")):
        return uri
    return f"sqlite:///{tracking.STORE_DIR.resolve() / 'optuna.db'}"


def open_storage(url: str):
    """Optuna's RDB storage on `url`: sqlite waits for another writer (trials report from other processes) instead
    of failing; PostgreSQL keeps Optuna's tables in their own schema of the tracking database."""
    import optuna

    engine: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite:///"):
        _prepare_sqlite(url)  # its folder, and WAL: trials report while the driver reads
        engine["connect_args"] = {"timeout": 60}
    elif url.startswith("postgresql"):
        import sqlalchemy

        e = sqlalchemy.create_engine(url)
        with e.begin() as c:
            c.execute(sqlalchemy.text(f"CREATE SCHEMA IF NOT EXISTS {PG_SCHEMA}"))
        e.dispose()
        engine["connect_args"] = {"options": f"-csearch_path={PG_SCHEMA}"}
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per trial: the sweep prints its own
    return optuna.storages.RDBStorage(url, engine_kwargs=engine)


def redact(url: str) -> str:
    return redact_uri(url)


# --- sampler, pruner, study --------------------------------------------------------------------------------------

def default_startup_trials(max_trials: int) -> int:
    """Trials drawn at random before the sampler models the results, and completed before a median pruner prunes:
    a quarter of the budget, at least 2, at most 10 (Optuna's TPE default, meant for budgets of 100s)."""
    return min(10, max(2, max_trials // 4))


def make_sampler(method: str, seed: int, startup_trials: int, concurrent: int = 1):
    """Optuna's sampler for `method`, seeded. TPE with trials in flight uses the constant liar (a running trial
    counts as a bad result), so concurrent asks do not all land on the same point."""
    import optuna

    if method not in SAMPLERS:
        raise ConfigError(f"method {method!r} is not an Optuna sampler: use one of {', '.join(SAMPLERS)}")
    cls = getattr(optuna.samplers, SAMPLERS[method])
    try:
        if method == "tpe":
            return cls(seed=seed, n_startup_trials=startup_trials, constant_liar=concurrent > 1)
        if method in ("gp", "cmaes"):
            return cls(seed=seed, n_startup_trials=startup_trials)
        return cls(seed=seed)
    except ImportError as e:  # GP needs scipy, CMA-ES the `cmaes` package
        raise ConfigError(f"method {method}: Optuna's {SAMPLERS[method]} needs {e.name or e}: pip install it") from None


def make_pruner(name: str, startup_trials: int = 2):
    """Optuna's pruner by name; a step is an epoch. median: below the median of earlier trials at the same epoch
    (after `startup_trials` completed trials); asha: successive halving (rungs at epochs 1, 3, 9, ...: the top third
    goes on); hyperband: several successive-halving brackets, up to the epochs of the first finished trial."""
    import optuna

    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=0)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto", reduction_factor=3)
    raise ConfigError(f"pruner {name!r}: use one of {', '.join(PRUNERS)}")


def study_family(identity: dict) -> str:
    """`sweep-<job>-<8 hex>`: the same search (job, base config, parameters, metric, method) has the same prefix,
    which is how `resume` finds its study."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"sweep-{identity.get('job', 'job')}-{digest}"


def open_study(storage, family: str, new_name: str, resume: bool, higher: bool, sampler, pruner):
    """A new study named `new_name`, or with `resume` the newest study of `family` (a new one when there is none)."""
    import optuna

    name = new_name
    if resume:
        mine = [s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
                if s.study_name.startswith(family + "-")]
        if mine:
            name = max(mine, key=lambda s: (s.datetime_start is not None, s.datetime_start or 0, s._study_id)).study_name
        else:
            log.info("sweep: no earlier study of this search to resume: starting %s", name)
    return optuna.create_study(storage=storage, study_name=name, load_if_exists=True, sampler=sampler, pruner=pruner,
                               direction="maximize" if higher else "minimize")


# --- the search space --------------------------------------------------------------------------------------------

def _encode(v: Any) -> Any:
    return v if isinstance(v, PRIMITIVE) else json.dumps(v)


def distributions(parameters: dict[str, Any], int_names: set[str] = frozenset()) -> dict[str, Any]:
    """The sweep's `parameters` as Optuna distributions: a list -> categorical (values that are not plain scalars,
    such as lists, as JSON), {min, max} -> uniform float, `log: true` -> log-uniform, a field that holds an integer
    (`int_names`) -> an integer range."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for name, v in parameters.items():
        if isinstance(v, (list, tuple)):
            out[name] = CategoricalDistribution([_encode(c) for c in v])
            continue
        lo, hi, log_ = float(v["min"]), float(v["max"]), bool(v.get("log", False))
        if lo > hi or (log_ and lo <= 0):
            raise ConfigError(f"parameter {name}: a range needs min <= max (and min > 0 with log: true)")
        if name in int_names:
            out[name] = IntDistribution(math.ceil(lo), math.floor(hi), log=log_)
        else:
            out[name] = FloatDistribution(lo, hi, log=log_)
    return out


def decode(parameters: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A trial's Optuna params back to config values (JSON-encoded choices decoded), in the sweep's order."""
    out = {}
    for name, v in parameters.items():
        value = params[name]
        if isinstance(v, (list, tuple)) and not any(value == c and type(value) is type(c) for c in v):
            value = next((c for c in v if _encode(c) == value), value)
        out[name] = value
    return out


def encode(parameters: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Config values as the Optuna params of `distributions` (for enqueuing a planned trial)."""
    return {k: _encode(v) if isinstance(parameters[k], (list, tuple)) else v for k, v in overrides.items()}


def space_size(dists: dict[str, Any]) -> float:
    """How many distinct points the space has (inf with a float range)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    n = 1.0
    for d in dists.values():
        if isinstance(d, CategoricalDistribution):
            n *= len(d.choices)
        elif isinstance(d, IntDistribution):
            n *= (d.high - d.low) // d.step + 1
        else:
            return math.inf
    return n


# --- driving a study: finished trials, duplicates, interrupted trials ------------------------------------------

def finished(study) -> list:
    """The study's COMPLETE and PRUNED trials (what resume keeps and never trains again)."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def close_interrupted(study) -> int:
    """Trials a killed sweep left RUNNING (or WAITING) are marked FAIL: their runs ended with the sweep. Returns
    how many."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        study._storage.set_trial_system_attr(t._trial_id, "finetune.fail_reason", "the sweep was interrupted")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        n += 1
    return n


def duplicate_of(study, trial) -> int | None:
    """The number of another trial with the same params that is finished or running, if any: a repeat is never
    trained (TPE can propose a point again, most of all in a small categorical space)."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)):
        if t.number != trial.number and t.params == trial.params:
            return t.number
    return None


def untried_point(dists: dict[str, Any], tried: list[dict[str, Any]], seed: int) -> dict[str, Any] | None:
    """A point of a finite space that no trial in `tried` (Optuna params) has, drawn at random (seeded); None when
    every point has been tried. What replaces a repeated proposal: TPE's choice over categories is an argmax, so in
    a small space it proposes the same point again and again once it has settled."""
    import itertools
    import random

    from optuna.distributions import CategoricalDistribution, IntDistribution

    def values(d):
        if isinstance(d, CategoricalDistribution):
            return list(d.choices)
        return list(range(d.low, d.high + 1, d.step))

    rng = random.Random(seed)
    names = list(dists)
    seen = {tuple(t.get(n) for n in names) for t in tried}
    if space_size(dists) <= 100_000:
        rest = [p for p in itertools.product(*(values(dists[n]) for n in names)) if p not in seen]
        return dict(zip(names, rng.choice(rest))) if rest else None
    for _ in range(1000):
        p = []
        for n in names:
            d = dists[n]
            if isinstance(d, (CategoricalDistribution, IntDistribution)):
                p.append(rng.choice(values(d)) if isinstance(d, CategoricalDistribution) else
                         rng.randrange(d.low, d.high + 1, d.step))
            else:  # an infinite space: any draw is new
                p.append(rng.uniform(d.low, d.high))
        if tuple(p) not in seen:
            return dict(zip(names, p))
    return None


def reject_duplicate(study, trial, other: int) -> None:
    """A repeated proposal is closed as FAIL (ignored by the samplers), marked as a duplicate of `other`."""
    from optuna.trial import TrialState

    study._storage.set_trial_system_attr(trial._trial_id, "finetune.duplicate_of", other)
    study.tell(trial, state=TrialState.FAIL)


def tell(study, number: int, status: str, value: float | None) -> None:
    """The driver's side of a trial's end: FINISHED -> COMPLETE with its metric (FAIL if not finite), PRUNED ->
    PRUNED (Optuna keeps its last reported value), anything else -> FAIL."""
    from optuna.trial import TrialState

    if status == "FINISHED" and isinstance(value, (int, float)) and math.isfinite(value):
        study.tell(number, value)
    elif status == "PRUNED":
        study.tell(number, state=TrialState.PRUNED)
    else:
        study.tell(number, state=TrialState.FAIL)


# --- the pruning hook (runs in the trial's process: a Ray worker) ---------------------------------------------

class PruningReporter:
    """`on_evaluation` for `tasks.training.train`: reports the metric after each evaluation to the trial in the
    study's storage and raises `TrialPruned` when the pruner says so. Holds only names (picklable for Ray); the
    study is loaded from the storage on first use."""

    def __init__(self, storage: str, study_name: str, trial_id: int, pruner: str, startup_trials: int, metric: str):
        self.storage, self.study_name, self.trial_id = storage, study_name, trial_id
        self.pruner, self.startup_trials, self.metric = pruner, startup_trials, metric
        self._trial = None

    def __getstate__(self):
        return {**self.__dict__, "_trial": None}

    def _load(self):
        if self._trial is None:
            import optuna

            study = optuna.load_study(study_name=self.study_name, storage=open_storage(self.storage),
                                      pruner=make_pruner(self.pruner, self.startup_trials),
                                      sampler=optuna.samplers.RandomSampler())
            self._trial = optuna.trial.Trial(study, self.trial_id)
        return self._trial

    def __call__(self, epoch: int, metrics: dict) -> None:
        value = metrics.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return  # nothing to compare (a non-finite metric fails the trial on its own)
        trial = self._load()
        trial.report(float(value), epoch)
        if trial.should_prune():
            raise TrialPruned(epoch, self.metric, float(value), self.reason(trial, epoch, float(value)), metrics)

    def reason(self, trial, epoch: int, value: float) -> str:
        """Why, in numbers: the trial's value against the other trials' at the same epoch."""
        import statistics

        from optuna.trial import TrialState

        others = [t.intermediate_values[epoch] for t in trial.study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
            if t._trial_id != self.trial_id and epoch in t.intermediate_values]
        where = (f"; the other {len(others)} trial(s) at epoch {epoch}: median {statistics.median(others):.4f}, "
                 f"best {max(others) if trial.study.direction.name == 'MAXIMIZE' else min(others):.4f}"
                 if others else "")
        return f"{self.pruner} pruner: {self.metric} {value:.4f} at epoch {epoch}{where}"
