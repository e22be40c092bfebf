"""Registry management commands: `finetune compare` (versions, their runs' key params and metrics, who holds which
alias), `finetune promote` (a version becomes champion by hand) and `finetune rollback` (champion back to the
version it replaced). The compare table is also a Prefect table artifact (`<registered-model>-versions`): every
training run publishes it after registering, and `finetune compare` does when PREFECT_API_URL points at a server."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

from prefect import flow

from flows import monitoring
from tasks import jobs, locks, registry, tracking

# The params and metrics shown per version. Metric names are the ones both trainers log per epoch (`eval_*`,
# `train_loss`), so the same columns line up in MLflow's compare view.
KEY_PARAMS = ["job", "problem", "engine", "train.model", "data.dataset", "data.train_samples", "train.epochs",
              "train.learning_rate", "train.batch_size"]
def key_metrics() -> list[str]:
    """train_loss, then every registered job's eval metrics (each job's own, in its order, without repeats)."""
    names = ["train_loss"]
    for recipe in jobs.all_jobs().values():
        names += [m for m in recipe.metrics if m not in names]
    return names


def _short(v: Any) -> str:
    s = "" if v is None else str(v)
    return s.rstrip("/").split("/")[-1] if "/" in s and len(s) > 30 else s


def _number(v: Any) -> str:
    """A numeric param in one spelling (5e-05 and 0.00005 alike -> 5e-05); `None` stays None; anything else as is."""
    if v in (None, "None", ""):
        return None
    try:
        return f"{float(v):g}"
    except (TypeError, ValueError):
        return str(v)


def _score(v: Any) -> str:
    """A promotion score tag (a float's repr, e.g. 0.503998) at the table's metric precision."""
    try:
        return f"{float(v):.4f}"
    except (TypeError, ValueError):
        return str(v or "-")


def compare_rows(name: str) -> list[dict[str, Any]]:
    """One row per version, newest first: version, aliases, the run's key params and final metrics, and the
    recorded promotion outcome. Raises LookupError when the model is not registered."""
    versions = registry.list_versions(name)
    if not versions:
        raise LookupError(f"registered model {name!r} not found (or has no versions) at {tracking.display_uri()}")
    by_version: dict[str, list[str]] = {}
    for alias, v in registry.aliases(name).items():
        by_version.setdefault(v, []).append(alias)
    c = tracking.client()
    metric_names = key_metrics()
    rows = []
    for mv in versions:
        row: dict[str, Any] = {"version": int(mv.version), "aliases": ",".join(sorted(by_version.get(str(mv.version), [])))}
        row["created"] = _time(mv.creation_timestamp)
        params: dict = {}
        metrics: dict = {}
        if mv.run_id:
            try:
                run = c.get_run(mv.run_id)
                params, metrics = run.data.params, run.data.metrics
                row["run"] = run.info.run_name or mv.run_id[:8]
            except Exception:
                row["run"] = mv.run_id[:8]
        for p in KEY_PARAMS:
            if p in params:
                row[p] = _number(_short(params[p]))
        for m in metric_names:
            if m in metrics:
                row[m] = round(float(metrics[m]), 4)
        tags = mv.tags or {}
        if tags.get("promotion.decision"):
            row["promotion"] = (f"{tags['promotion.decision']} ({tags.get('promotion.metric', '')} "
                                f"{_score(tags.get('promotion.challenger_score'))} vs "
                                f"{_score(tags.get('promotion.champion_score'))})")
        rows.append(row)
    return rows


def _time(ms: int | None) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M") if ms else ""


def _columns(rows: list[dict]) -> list[str]:
    order = ["version", "aliases", "created", "run", *KEY_PARAMS, *key_metrics(), "promotion"]
    present = {k for r in rows for k in r}
    return [c for c in order if c in present]


TABLE_WIDTH = 120  # the default table fits a terminal this wide; --wide shows every column


def _narrow(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """The key columns that fit TABLE_WIDTH, most important first (version, aliases, the eval metrics, the promotion
    decision, when, what changed between runs...), shown in the table's usual order; the promotion cell is its
    decision word. Everything else is in `--wide` and `--json`."""
    metrics = [m for m in key_metrics() if m != "train_loss"]
    priority = ["version", "aliases", *metrics, "promotion", "created", "engine", "train.epochs",
                "train.learning_rate", "data.train_samples", "train_loss", "train.model", "data.dataset",
                "train.batch_size", "job", "run"]
    rows = [{**r, "promotion": str(r["promotion"]).split(" ")[0]} if r.get("promotion") else r for r in rows]
    present = _columns(rows)
    metric_set = set(key_metrics())
    width, chosen = 0, set()
    for c in [c for c in priority if c in present]:
        w = max(len(SHORT_HEADERS.get(c, c)), *(len(_cell(c, r.get(c), metric_set)) for r in rows)) + 3
        if width + w <= TABLE_WIDTH:
            chosen.add(c)
            width += w
    return [c for c in present if c in chosen], rows


# Headers of the default table (the param names in full with --wide and --json).
SHORT_HEADERS = {"train.model": "model", "data.dataset": "dataset", "data.train_samples": "samples",
                 "train.epochs": "epochs", "train.learning_rate": "lr", "train.batch_size": "batch"}


def _cell(col: str, v: Any, metrics: set[str]) -> str:
    if col in metrics and isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v:.4f}"  # one precision for every metric, so columns line up and compare by eye
    return "-" if v is None else str(v)


def format_table(rows: list[dict], wide: bool = False) -> str:
    """The compare table as text: header, rule, one line per row; styled only when stdout is a terminal. By default
    the key columns that fit TABLE_WIDTH (`_narrow`); `wide`: every column, full promotion notes."""
    import io

    from rich import box
    from rich.console import Console
    from rich.table import Table

    cols, rows = (_columns(rows), rows) if wide else _narrow(rows)
    metrics = set(key_metrics())  # once per table: it walks the job registry
    cells = [[_cell(c, r.get(c), metrics) for c in cols] for r in rows]
    headers = cols if wide else [SHORT_HEADERS.get(c, c) for c in cols]
    styled = sys.stdout.isatty()
    utf8 = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "") == "utf8"
    rule = box.SIMPLE_HEAD if utf8 else box.Box("    \n    \n -- \n    \n    \n    \n    \n    \n", ascii=True)
    table = Table(box=rule, show_edge=False, pad_edge=False, header_style="bold" if styled else "")
    for c, h in zip(cols, headers):
        table.add_column(h, justify="right" if c == "version" or c in metrics else "left", no_wrap=True)
    for row in cells:
        table.add_row(*row)
    # wide enough that no cell wraps: the table keeps its natural width
    width = sum(max(len(h), *(len(row[i]) for row in cells)) + 3 for i, h in enumerate(headers)) + 1
    console = Console(file=io.StringIO(), width=width, force_terminal=styled, color_system="standard" if styled else None)
    console.print(table)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())


def publish_compare_artifact(name: str, rows: list[dict] | None = None) -> None:
    """The compare table as a Prefect table artifact, when running inside a flow or task."""
    if not monitoring.in_prefect_run():
        return
    try:
        rows = rows if rows is not None else compare_rows(name)
    except Exception as e:
        monitoring.log.warning("could not build the versions table of %s: %s", name, e)
        return
    cols = _columns(rows)
    table = [{c: r.get(c, "") for c in cols} for r in rows]  # same columns in every row: the UI shows a grid
    monitoring.publish_table(table, f"{name}-versions", f"{name}: versions, aliases, key params and metrics")


@flow(name="compare-versions", flow_run_name="compare-{registered_model}")
def compare_flow(registered_model: str) -> list[dict]:
    """Versions of a registered model with their runs' key params and metrics, as a Prefect table artifact."""
    rows = compare_rows(registered_model)
    publish_compare_artifact(registered_model, rows)
    return rows


# --- CLI ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def prefect_console_quiet():
    """Prefect's console log lines ("Beginning flow run...", "Finished in state Completed()") off for the block, so
    a command that runs a flow for its artifact prints only its own output; the flow run's logs still reach the
    Prefect server."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return record.levelno >= logging.WARNING

    drop = _Drop()
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    handlers = {h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)}
    for h in handlers:
        h.addFilter(drop)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(drop)


def compare_cli(args: argparse.Namespace) -> int:
    import json

    name = args.registered_model
    try:
        tracking.check_remote()
        if os.environ.get("PREFECT_API_URL"):
            # a refusal (401/403) or an unknown model is one error line, found before Prefect starts
            if not registry.list_versions(name):
                compare_rows(name)  # raises the LookupError that names the model and the store
            with prefect_console_quiet():
                rows = compare_flow(name)
        else:
            rows = compare_rows(name)
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "as_json", False):
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(format_table(rows, wide=getattr(args, "wide", False)))
    return 0


def promote(name: str, version: str | int) -> str | None:
    """Manual promotion: `version` becomes champion without an evaluation (a person decided). Returns the
    replaced champion version."""
    if registry.get_version(name, version) is None:
        raise LookupError(f"{name} version {version} not found: `finetune compare --registered-model {name}` lists them")
    with locks.registry_lock(name):
        old = registry.move_champion(name, str(version), "manual promotion (finetune promote)")
        registry.set_version_tags(name, version, {"promotion.decision": "promoted", "promotion.reason": "manual promotion"})
    return old


def promote_cli(args: argparse.Namespace) -> int:
    name, version = args.registered_model, str(args.version)
    try:
        tracking.check_remote()
        if registry.alias_version(name, registry.CHAMPION) == version:
            print(f"{name} version {version} already is the champion")
            return 0
        old = promote(name, version)
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{name}: champion -> version {version}" + (f" (was {old}; `finetune rollback` restores it)" if old else ""))
    return 0


def rollback_cli(args: argparse.Namespace) -> int:
    try:
        tracking.check_remote()
        with locks.registry_lock(args.registered_model):
            frm, to = registry.rollback_champion(args.registered_model)
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.registered_model}: champion rolled back from version {frm} to version {to}")
    return 0
