"""Bounded disk. Checkpoints exist only while a run can still resume: once a run finished and its model is logged
(and registered), `prune_run_dir` removes its checkpoints and local model copy, keeping the small files (metrics,
config, evaluation extras). `collect` + `apply` are `finetune gc`: run dirs that finished, failed or orphaned runs
left behind, dataset caches nobody used for a while, stale RUNNING runs, and registered model versions beyond a
retention count that hold no alias. Everything is planned first (what, why, bytes), so a dry run shows exactly what
applying would do."""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlparse

from tasks import liveness, registry, tracking
from tasks.tracking import store_id

log = logging.getLogger(__name__)

# What a run dir holds that only a resume needs: plain-loop checkpoints, the HF Trainer's checkpoints, the model copy
# (logged to MLflow), and leftovers of interrupted atomic writes (`.model.tmp-PID`, `.model.old-PID`).
HEAVY = ("checkpoints", "trainer", "model")
KEPT_FROM_MODEL = ("metrics.json", "config.yaml")
RUN_ID = re.compile(r"[0-9a-f]{32}")


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (symlinks count as links: a LoRA base links to weights it does not own)."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for root, dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def heavy_parts(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir()
                  if p.name in HEAVY or (p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)))


def prune_run_dir(run_dir: str | Path) -> int:
    """Removes a finished run's checkpoints and model copy; `metrics.json` and `config.yaml` of the model dir move
    up into the run dir. Returns the bytes freed."""
    run = Path(run_dir)
    model = run / "model"
    for name in KEPT_FROM_MODEL:
        if (model / name).is_file():
            shutil.copy2(model / name, run / name)
    freed = 0
    for p in heavy_parts(run):
        freed += tree_bytes(p)
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    return freed


# --- finetune gc ----------------------------------------------------------------------------------------------


@dataclass
class Item:
    kind: str  # run-dir | run-files | cache | version | model | stale-run | kept (reported, left alone)
    what: str
    reason: str
    bytes: int = 0
    apply: Callable[[], None] = field(default=lambda: None, repr=False)


def _rm(path: Path) -> Callable[[], None]:
    return lambda: shutil.rmtree(path, ignore_errors=True)


def run_status(run_id: str) -> str:
    """FINISHED, FAILED, KILLED, RUNNING, SCHEDULED, DELETED (in MLflow's trash), UNKNOWN (no such run in this
    tracking store: a 404, or the 403 an authenticated server answers for a run id it does not hold) or
    UNREACHABLE (the store did not answer: nothing is decided on that)."""
    try:
        run = tracking.client().get_run(run_id)
    except Exception as e:
        code = getattr(e, "error_code", None)
        http = getattr(getattr(e, "response", None), "status_code", None)
        if tracking.auth_status(e) == 401:
            raise
        if code in ("RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED", "INVALID_PARAMETER_VALUE") or http in (403, 404):
            return "UNKNOWN"
        log.warning("gc: could not read MLflow run %s: %s", run_id, tracking.redact_uri(e))
        return "UNREACHABLE"
    return "DELETED" if run.info.lifecycle_stage == "deleted" else run.info.status


def grace_days_default() -> float:
    return float(os.environ.get("FINETUNE_GC_GRACE_DAYS", "7"))


def plan_run_dirs(output_dir: str | Path, status_of: Callable[[str], str] = run_status, store: str | None = None,
                  grace_days: float | None = None, now: float | None = None) -> list[Item]:
    """`<output_dir>/<job>/<mlflow run id>/`, each judged only by what proves it finished and belongs to `store`
    (default: the store this process talks to), read from the dir's record (`tasks.liveness.RECORD`):

    - a run of this store: FINISHED keeps only its small files; FAILED, KILLED or DELETED loses the whole dir (gc
      gives up resuming it); RUNNING is left alone;
    - a dir whose store does not hold its run (or of another store): acted on only when its own record says its
      process is dead and was last seen more than `grace_days` ago (the whole dir when the record names this
      store, only checkpoints and model copy otherwise); else reported and left alone;
    - a dir without a record (written before records existed) that this store does not know: reported, left alone.
    """
    items: list[Item] = []
    root = Path(output_dir)
    if not root.is_dir():
        return items
    if store is None:
        store = store_id()
    grace = (grace_days_default() if grace_days is None else grace_days) * 86400
    now = time.time() if now is None else now
    for job_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for run in sorted(p for p in job_dir.iterdir() if p.is_dir() and RUN_ID.fullmatch(p.name)):
            rec = liveness.read_record(run)
            ours = rec is None or rec.get("tracking_store") == store
            heavy = heavy_parts(run)
            status = status_of(run.name) if ours else "OTHER-STORE"
            if status in ("RUNNING", "SCHEDULED"):
                continue
            if status == "FINISHED":
                if heavy:
                    items.append(Item("run-files", str(run), "run FINISHED: checkpoints and model copy",
                                      sum(tree_bytes(p) for p in heavy), lambda r=run: prune_run_dir(r)))
            elif status in ("FAILED", "KILLED", "DELETED"):
                what = "run deleted in MLflow" if status == "DELETED" else f"run {status}"
                items.append(Item("run-dir", str(run), what, tree_bytes(run), _rm(run)))
            elif not heavy and (rec is None or not ours or status == "UNREACHABLE"):
                continue  # nothing gc would free: not worth a line (a finished run of another store, say)
            elif status == "UNREACHABLE":
                items.append(Item("kept", str(run), "the tracking store did not answer for this run: left alone"))
            elif rec is None:
                items.append(Item("kept", str(run), "no such run in this tracking store and no record of its own "
                                  f"store ({liveness.RECORD}, written since gc checks stores): left alone; remove it "
                                  "by hand if nothing uses it", 0))
            else:
                where = "no such run in this tracking store" if ours else \
                    f"a run of another tracking store ({rec['tracking_store']})"
                alive, why, seen = liveness.record_verdict(rec, now)
                if not alive and now - seen > grace:
                    age = f"{why}, last seen {(now - seen) / 86400:.1f} days ago"
                    if ours:
                        items.append(Item("run-dir", str(run), f"{where}; {age}", tree_bytes(run), _rm(run)))
                    elif heavy:
                        items.append(Item("run-files", str(run), f"{where}; {age}: checkpoints and model copy",
                                          sum(tree_bytes(p) for p in heavy), lambda r=run: prune_run_dir(r)))
                else:
                    state = f"{why}, within the {grace / 86400:g}-day grace period" if not alive else why
                    size = f"; holds {human_bytes(sum(tree_bytes(p) for p in heavy))} of checkpoints" if heavy else ""
                    hint = "" if ours else f" (clean it with MLFLOW_TRACKING_URI={rec['tracking_store']} finetune gc)"
                    items.append(Item("kept", str(run), f"{where}, {state}{size}: left alone{hint}", 0))
    return items


def plan_caches(cache_dir: str | Path, max_age_days: float, now: float | None = None) -> list[Item]:
    """Prepared dataset and tokenizer caches (`<cache>/<kind>/<key>`) unused for `max_age_days` (a cache hit
    refreshes the entry's time), and leftovers of interrupted writes older than an hour. A removed entry is
    rebuilt on its next use."""
    now = time.time() if now is None else now
    items: list[Item] = []
    root = Path(cache_dir)
    if not root.is_dir():
        return items
    for kind in sorted(p for p in root.iterdir() if p.is_dir()):
        for entry in sorted(kind.iterdir()):
            age = now - entry.lstat().st_mtime
            if entry.name.startswith(".") and ".tmp-" in entry.name and age > 3600:
                items.append(Item("cache", str(entry), "interrupted write", tree_bytes(entry), _rm(entry)))
            elif not entry.name.startswith(".") and age > max_age_days * 86400:
                items.append(Item("cache", str(entry), f"unused for {age / 86400:.0f} days", tree_bytes(entry),
                                  _rm(entry)))
    return items


def _local_path(uri: str | None) -> Path | None:
    if not uri:
        return None
    u = urlparse(uri)
    if u.scheme == "file":
        return Path(unquote(u.path))
    if u.scheme == "" and uri.startswith("/"):
        return Path(uri)
    return None


def finetune_models() -> list[str]:
    """Registered models this project created (its description), the default scope of version retention."""
    return sorted(m.name for m in tracking.client().search_registered_models(max_results=1000)
                  if (m.description or "").startswith("Registered by finetune-flows"))


def plan_versions(models: list[str], keep: int) -> list[Item]:
    """Versions beyond the newest `keep` of each model that hold no alias (champion, challenger,
    previous-champion or any other alias is never touched). Deleting one also deletes its logged model; its
    artifacts are removed here when they are local files (a tracking server frees them with `mlflow gc`)."""
    c = tracking.client()
    items: list[Item] = []
    for name in models:
        with tracking.on_model(name, "READ"):
            aliased = set(registry.aliases(name).values())
            versions = registry.list_versions(name)  # newest first
        for mv in versions[keep:]:
            if str(mv.version) in aliased:
                continue
            # the version's logged model (MLflow 3: source `models:/m-<id>`; search results may not fill model_id)
            m = re.fullmatch(r"models:/(m-[0-9a-f]+)", mv.source or "")
            model_id = getattr(mv, "model_id", None) or (m.group(1) if m else None)
            where, size = None, 0
            if model_id:
                try:
                    where = _local_path(c.get_logged_model(model_id).artifact_location)
                except Exception:
                    where = None
            if where is not None and where.exists():
                size = tree_bytes(where)

            def delete(name=name, version=str(mv.version), model_id=model_id, where=where) -> None:
                with tracking.on_model(name, "MANAGE"):
                    c.delete_model_version(name, version)
                if model_id:
                    try:
                        c.delete_logged_model(model_id)
                    except Exception as e:
                        log.warning("could not delete logged model %s: %s", model_id, e)
                if where is not None:
                    shutil.rmtree(where, ignore_errors=True)
                    if where.name == "artifacts" and where.parent.name == model_id:
                        shutil.rmtree(where.parent, ignore_errors=True)

            note = "" if where is not None or not model_id else " (artifacts freed by the server's `mlflow gc`)"
            items.append(Item("version", f"{name} version {mv.version}",
                              f"beyond the newest {keep}, no alias{note}", size, delete))
    return items


def delete_logged_model(model_uri_or_id: str) -> int:
    """Deletes a logged model (`models:/m-<id>` or its id) and, in a local store, its artifact files; returns the
    bytes freed here (a tracking server frees its artifacts with `mlflow gc`)."""
    m = re.fullmatch(r"(?:models:/)?(m-[0-9a-f]+)", model_uri_or_id or "")
    if not m:
        return 0
    c = tracking.client()
    try:
        where = _local_path(c.get_logged_model(m.group(1)).artifact_location)
    except Exception:
        where = None
    size = tree_bytes(where) if where is not None and where.exists() else 0
    c.delete_logged_model(m.group(1))
    if where is not None:
        shutil.rmtree(where, ignore_errors=True)
        if where.name == "artifacts" and where.parent.name == m.group(1):
            shutil.rmtree(where.parent, ignore_errors=True)
    return size


def plan_unregistered_models() -> list[Item]:
    """Logged models of finished finetune runs that no registered version uses (the losing trials of sweeps from
    before sweeps cleaned up after themselves, a run whose registration failed): their weights serve nothing. A run
    still RUNNING, or a trial whose sweep still runs (its best trial is registered at the end), is left alone."""
    from mlflow.entities import ViewType

    c = tracking.client()
    used_models, used_runs = set(), set()
    for mv in c.search_model_versions(max_results=10000):
        m = re.fullmatch(r"models:/(m-[0-9a-f]+)", mv.source or "")
        used_models.add(getattr(mv, "model_id", None) or (m.group(1) if m else None))
        r = re.match(r"runs:/([0-9a-f]+)/", mv.source or "")
        if r:
            used_runs.add(r.group(1))
    exps = [e.experiment_id for e in c.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    runs: dict[str, object] = {}

    def run_of(run_id: str):
        if run_id not in runs:
            try:
                runs[run_id] = c.get_run(run_id)
            except Exception:
                runs[run_id] = None
        return runs[run_id]

    items: list[Item] = []
    for i in range(0, len(exps), 100):  # the search takes at most 100 experiments
        token = None
        while True:
            page = c.search_logged_models(exps[i:i + 100], max_results=1000, page_token=token)
            for lm in page:
                rid = lm.source_run_id
                if lm.model_id in used_models or not rid or rid in used_runs:
                    continue
                run = run_of(rid)
                if run is None or run.info.status != "FINISHED" or "finetune.job" not in run.data.tags:
                    continue
                parent = run.data.tags.get("mlflow.parentRunId")
                if parent and (p := run_of(parent)) is not None and p.info.status == "RUNNING":
                    continue
                where = _local_path(lm.artifact_location)
                size = tree_bytes(where) if where is not None and where.exists() else 0
                note = "" if where is not None else " (artifacts freed by the server's `mlflow gc`)"
                def delete(mid=lm.model_id, rid=rid) -> None:
                    with tracking.on_run(rid, "EDIT"):
                        delete_logged_model(mid)

                items.append(Item("model", f"logged model {lm.model_id} of run {rid} ({run.info.run_name})",
                                  f"run FINISHED, model never registered{note}", size, delete))
            token = page.token
            if not token:
                break
    return items


def plan_stale_runs() -> list[Item]:
    return [Item("stale-run", f"MLflow run {v.run_id}", v.reason, 0,
                 lambda v=v: liveness.sweep_one(v)) for v in liveness.sweep_stale_runs(None, apply=False)]


def collect(output_dirs: list[str | Path], cache_dir: str | Path | None, cache_days: float,
            models: list[str] | None, keep_versions: int | None, grace_days: float | None = None) -> list[Item]:
    """Everything `finetune gc` would do. Stale runs come first: once marked KILLED their dirs count as failed."""
    items = plan_stale_runs()
    stale = {i.what.split()[-1] for i in items}
    for out in output_dirs:
        status_of = (lambda rid: "KILLED" if rid in stale else run_status(rid))
        items += plan_run_dirs(out, status_of, grace_days=grace_days)
    if cache_dir is not None:
        items += plan_caches(cache_dir, cache_days)
    if keep_versions is not None:
        items += plan_versions(finetune_models() if models is None else models, keep_versions)
    items += plan_unregistered_models()
    return items


def apply(items: list[Item]) -> list[tuple[Item, str | None]]:
    """Applies each item in order; returns (item, error or None)."""
    done = []
    for it in items:
        try:
            it.apply()
            done.append((it, None))
        except Exception as e:
            log.warning("gc: %s failed: %s", it.what, e)
            done.append((it, f"{type(e).__name__}: {e}"))
    return done


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
