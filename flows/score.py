"""Batch scoring flow (the `score-nightly` deployment): resolve the model version once, score the input in
streamed chunks (locally or on Ray Data), show progress (rows done / total) and a summary artifact (model name,
version and run, rows in/out/skipped and why, rows/s, output path). The work is `tasks.scoring`'s plain
functions; this module only wires them into Prefect."""
from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.monitoring import _best_effort, _create_markdown, _create_progress, _update_progress, artifact_key
from tasks.common import run_logger
from tasks.scoring import ModelRef, ScoreConfig, format_summary, plan_input, resolve_model, score


@task(name="resolve-model", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30])
def resolve_model_task(cfg: ScoreConfig) -> ModelRef:
    """The alias read once: the rest of the run uses this version, whatever the registry does meanwhile."""
    plan_input(cfg)  # a missing file or column fails here, before the model loads
    return resolve_model(cfg.registered_model, cfg.alias, cfg.version)


@task(name="score", cache_policy=NO_CACHE, task_run_name="score-{ref.name}-v{ref.version}")
def score_task(cfg: ScoreConfig, ref: ModelRef) -> dict:
    log = run_logger(__name__)
    key = artifact_key(cfg.registered_model, "score-progress")
    state: dict = {"id": None, "logged": -1.0}

    def progress(done: int, total: int) -> None:
        pct = 100.0 * done / total if total else 100.0
        desc = f"scored {done:,} / {total:,} rows with {ref.name} v{ref.version}"
        if state["id"] is None:
            state["id"] = _best_effort("progress artifact", _create_progress, pct, key, desc)
        else:
            _best_effort("progress", _update_progress, state["id"], pct, desc)
        if pct - state["logged"] >= 10 or done == total:  # a log line every 10%
            state["logged"] = pct
            log.info(desc)

    return score(cfg, progress=progress, ref=ref)


def summary_markdown(s: dict) -> str:
    m = s["model"]
    skipped = "".join(f"\n| &nbsp;&nbsp;{why} | {n:,} |" for why, n in s["skipped"].items())
    rate = f"{s['rows_per_second']:,.1f}" if s.get("rows_per_second") else "-"
    return (
        f"### Batch scoring: {m['name']} version {m['version']}\n\n"
        f"| | |\n|---|---|\n"
        f"| model | `{m['uri']}` (asked for `{m['requested']}`) |\n"
        f"| MLflow run of the version | `{m['run_id']}` |\n"
        f"| rows in | {s['rows_in']:,} |\n| rows out | {s['rows_out']:,} |\n"
        f"| rows skipped (kept, null prediction) | {s['rows_skipped']:,} |{skipped}\n"
        f"| rows scored this run | {s['rows_scored_this_run']:,} (resumed: {s['resumed_rows']:,}) |\n"
        f"| rows/s | {rate} on {s['device']} ({s['engine']}) |\n"
        f"| output | `{s['output']}` ({s['format']}), metadata `{s['output']}.meta.json` |\n"
    )


@flow(name="score", flow_run_name="score-{config.registered_model}", log_prints=True)
def score_flow(config: ScoreConfig) -> dict:
    """Score a file, folder or glob with a registered model (default: its champion) into one output file."""
    ref = resolve_model_task(config)
    summary = score_task(config, ref)
    _best_effort("summary artifact", _create_markdown, summary_markdown(summary),
                 artifact_key(config.registered_model, "score-summary"),
                 f"scoring with {ref.name} v{ref.version}: {summary['rows_out']:,} rows")

    print(format_summary(summary))
    return summary
