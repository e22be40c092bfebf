"""What a training run shows in the Prefect UI: readable task run names, epoch lines through Prefect's logger, a
progress artifact moved each epoch, a table artifact of per-epoch metrics, and a markdown summary (MLflow run link,
model URI, promotion decision). Everything here is best effort: a monitoring failure is logged, never fatal, and
outside a Prefect run (plain function tests) nothing is sent."""
from __future__ import annotations

import logging
import re
from typing import Any, Callable

from flows.common import job_label
from tasks import tracking
from tasks.common import run_logger

log = logging.getLogger(__name__)


def artifact_key(*parts: str) -> str:
    """Artifact keys may hold only lowercase letters, digits and dashes."""
    key = "-".join(re.sub(r"[^a-z0-9]+", "-", str(p).lower()).strip("-") for p in parts if p)
    return re.sub(r"-+", "-", key)[:120] or "finetune"


def in_prefect_run() -> bool:
    try:
        from prefect.context import FlowRunContext, TaskRunContext

        return FlowRunContext.get() is not None or TaskRunContext.get() is not None
    except Exception:
        return False


def _best_effort(what: str, fn: Callable, *args, **kwargs) -> Any:
    if not in_prefect_run():
        return None
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # the UI missing a card must not fail a training run
        log.warning("could not publish %s to Prefect: %s: %s", what, type(e).__name__, e)
        return None


# --- readable run names -------------------------------------------------------------------------------------


def train_task_run_name(parameters: dict[str, Any]) -> str:
    """`task_run_name` for a training task whose first parameter is the job spec (or config): model, dataset, epochs."""
    cfg = parameters.get("spec") or parameters.get("cfg") or parameters.get("config")
    try:
        return f"train-{job_label(cfg)}"
    except AttributeError:
        return "train"


def register_task_run_name(parameters: dict[str, Any]) -> str:
    cfg = parameters.get("cfg")
    try:
        return f"register-{cfg.registered_model}"
    except AttributeError:
        return "register-and-promote"


# --- during training -----------------------------------------------------------------------------------------


def _fmt(v: Any) -> Any:
    return round(v, 4) if isinstance(v, float) else v


class MonitoredMetrics:
    """`on_metrics(metrics, step)` callback that chains to another one (MLflow's MetricsLogger) and then shows the
    epoch in Prefect: a log line, the progress artifact (`<key>-progress`) and the per-epoch table
    (`<key>-epoch-metrics`). `step` is the epoch number (1-based), as the trainers report it."""

    def __init__(self, inner: Callable[[dict, int], None] | None, total_epochs: int, key: str = "training",
                 label: str | None = None):
        self.inner = inner
        self.total = max(int(total_epochs), 1)
        self.key = artifact_key(key)
        self.label = label or key
        self.rows: list[dict] = []
        self.progress_id = _best_effort(
            "progress artifact", _create_progress, 0.0, f"{self.key}-progress", f"{self.label}: epoch 0/{self.total}"
        )

    def __call__(self, metrics: dict, step: int) -> None:
        if self.inner is not None:
            self.inner(metrics, step)  # MLflow first: the record of the run matters more than the UI card
        row = {"epoch": int(step), **{k: _fmt(v) for k, v in metrics.items() if isinstance(v, (int, float))}}
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        pct = min(100.0, 100.0 * step / self.total)

        run_logger(__name__).info("epoch %d/%d (%.0f%%): %s", step, self.total, pct,
                         " ".join(f"{k}={v}" for k, v in row.items() if k != "epoch"))
        desc = f"{self.label}: epoch {step}/{self.total}"
        if self.progress_id is not None:
            _best_effort("progress", _update_progress, self.progress_id, pct, desc)
        _best_effort("epoch table", _create_table, self.rows, f"{self.key}-epoch-metrics",
                     f"{self.label}: metrics per epoch (epoch {step}/{self.total})")


def _create_progress(progress: float, key: str, description: str):
    from prefect.artifacts import create_progress_artifact

    return create_progress_artifact(progress=progress, key=key, description=description)


def _update_progress(artifact_id, progress: float, description: str):
    from prefect.artifacts import update_progress_artifact

    return update_progress_artifact(artifact_id=artifact_id, progress=progress, description=description)


def _create_table(rows: list[dict], key: str, description: str):
    from prefect.artifacts import create_table_artifact

    return create_table_artifact(table=list(rows), key=key, description=description)


def _create_markdown(markdown: str, key: str, description: str):
    from prefect.artifacts import create_markdown_artifact

    return create_markdown_artifact(markdown=markdown, key=key, description=description)


def publish_table(rows: list[dict], key: str, description: str) -> None:
    _best_effort("table artifact", _create_table, rows, artifact_key(key), description)


# --- after training ------------------------------------------------------------------------------------------


def mlflow_run_link(run_id: str, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """(markdown text for the run, http link or None). A local sqlite store gets the `mlflow ui` command."""
    uri = tracking.redact_uri(tracking_uri or tracking.tracking_uri())  # never a user:password@ in a link
    try:
        exp_id = tracking.client().get_run(run_id).info.experiment_id
    except Exception:
        exp_id = None
    path = f"#/experiments/{exp_id}/runs/{run_id}" if exp_id else ""
    if uri.startswith(("http://", "https://")):
        url = f"{uri.rstrip('/')}/{path}"
        return f"[{run_id}]({url})", url
    return (f"`{run_id}` (local store: run `mlflow ui --backend-store-uri {uri}` and open "
            f"http://127.0.0.1:5000/{path})"), None


def summary_markdown(job: str, registered_model: str, run_id: str, metrics: dict, outcome: dict,
                     tracking_uri: str | None = None) -> str:
    run_md, _ = mlflow_run_link(run_id, tracking_uri)
    version = outcome.get("version")
    aliases = ", ".join(outcome.get("aliases") or []) or "none"
    lines = [
        f"# {job}: {registered_model} version {version}",
        "",
        "| | |",
        "|---|---|",
        f"| MLflow run | {run_md} |",
        f"| Model URI | `{outcome.get('model_uri', f'models:/{registered_model}/{version}')}` |",
        f"| Aliases | {aliases} |",
        f"| Promotion | {outcome.get('decision') or 'n/a'} |",
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, float)]
    p = outcome.get("promotion") or {}
    if p.get("metric"):
        lines += ["", "## Champion / challenger", "", f"Metric `{p['metric']}`, margin {p.get('margin', 0):g}.", "",
                  "| role | version | score |", "|---|---|---|",
                  f"| challenger | {p.get('challenger_version')} | {_score(p.get('challenger_score'))} |",
                  f"| champion | {p.get('champion_version') or '-'} | {_score(p.get('champion_score'))} |"]
    if outcome.get("predict_cmd"):
        lines += ["", "## Use it", "", "```", outcome["predict_cmd"],
                  f"mlflow models serve -m models:/{registered_model}@champion --env-manager local -p 5001", "```"]
    return "\n".join(lines)


def _score(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else "-"


def summary_artifact(job: str, registered_model: str, run_id: str, metrics: dict, outcome: dict,
                     tracking_uri: str | None = None) -> None:
    """Markdown summary of a training run (key `<registered-model>-summary`)."""
    if not in_prefect_run():
        return
    md = _best_effort("summary", summary_markdown, job, registered_model, run_id, metrics, outcome, tracking_uri)
    if md:
        _best_effort("summary artifact", _create_markdown, md, artifact_key(registered_model, "summary"),
                     f"{job} run summary: MLflow run, model URI, promotion decision")


def promotion_artifact(name: str, result: dict) -> None:
    """Markdown card of one champion/challenger decision (key `<registered-model>-promotion`)."""
    if not in_prefect_run():
        return
    md = "\n".join([
        f"# Champion/challenger: {name}",
        "",
        f"**{'PROMOTED' if result['promoted'] else 'NOT PROMOTED'}**: {result['decision']}",
        "",
        f"Metric `{result['metric']}`, margin {result['margin']:g}.",
        "",
        "| role | version | score | error |",
        "|---|---|---|---|",
        f"| challenger | {result['challenger_version']} | {_score(result.get('challenger_score'))} | "
        f"{result.get('challenger_error') or ''} |",
        f"| champion | {result.get('champion_version') or '-'} | {_score(result.get('champion_score'))} | "
        f"{result.get('champion_error') or ''} |",
        *([f"| {result['baseline']} baseline | - | {_score(result.get('baseline_score'))} | "
           f"{result.get('baseline_error') or ''} |"] if result.get("baseline") else []),
    ])
    _best_effort("promotion artifact", _create_markdown, md, artifact_key(name, "promotion"),
                 f"champion/challenger decision for {name}")
