"""`finetune predict` and `finetune score`: predictions from a registered model, for a few texts or a whole file."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from flows.commands import command, registered_model_option
from tasks import predict, registry, scoring, tracking
from tasks.common import ConfigError


def _predict(registered_model: str, alias: str | None, version: int | None, file: str | None, top_k: int,
             as_json: bool, texts: tuple[str, ...]) -> int:
    if alias is not None and version is not None:
        raise click.UsageError("--alias and --version are mutually exclusive: pass one of them")
    texts_ = list(texts)
    if file:
        f = Path(file)
        if not f.is_file():
            raise ConfigError(f"--file {file!r} not found: pass a text file with one text per line")
        try:
            texts_ += [ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError as e:
            raise ConfigError(f"--file {file!r} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from None
    tracking.check_remote()
    results = predict.predict(registry.model_uri(registered_model, alias, version), texts_, top_k)
    print(json.dumps(results, indent=2) if as_json else predict.format_predictions(results))
    return 0


def _score(as_json: bool, **kwargs: Any) -> int:
    """`finetune score`: the plain streaming job in this process (no Prefect server to start); the nightly
    deployment runs the same functions as the `score` flow (flows/score.py)."""
    given = {k: v for k, v in kwargs.items() if v is not None and v != ()}
    if "id_columns" in given:
        given["id_columns"] = [c.strip() for v in given["id_columns"] for c in v.split(",") if c.strip()]
    try:
        cfg = scoring.ScoreConfig(**given)
    except ConfigError:
        raise
    except ValueError as e:  # pydantic: one line per problem
        errs = getattr(e, "errors", lambda: [])()
        raise ConfigError([f"--{'-'.join(str(x) for x in er['loc']).replace('_', '-')}: {er['msg']}" for er in errs]
                          or str(e)) from None
    scoring.plan_input(cfg)  # missing file or column: one error line before the registry is asked
    tracking.check_remote()
    summary = scoring.score(cfg, progress=_progress_line())
    print(json.dumps(summary, indent=2, default=str) if as_json else scoring.format_summary(summary))
    return 0


def _progress_line():
    """rows done / total on stderr, one line per chunk (a few per second at most)."""
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.time()
        if done == total or now - last[0] > 2:
            last[0] = now
            print(f"scored {done:,} / {total:,} rows", file=sys.stderr, flush=True)

    return show


def _score_options() -> list[click.Parameter]:
    f = scoring.ScoreConfig.model_fields

    def opt(flag: str, name: str, **kw) -> click.Option:
        d = f[name].get_default(call_default_factory=True)
        shown = f"  [default: {d}]" if d not in (None, [], False) and not f[name].is_required() else ""
        return click.Option([flag, name], help=(f[name].description or "").replace(
            "not with alias", "not with --alias").replace("not with version", "not with --version") + shown, **kw)

    return [
        registered_model_option(),
        opt("--alias", "alias", metavar="ALIAS"),
        opt("--version", "version", type=int, metavar="N"),
        opt("--input", "input", required=True, metavar="PATH"),
        opt("--output", "output", required=True, metavar="PATH"),
        opt("--text-column", "text_column", metavar="COLUMN"),
        opt("--text-pair-column", "text_pair_column", metavar="COLUMN"),
        opt("--id-columns", "id_columns", multiple=True, metavar="COL[,COL...]"),
        opt("--output-format", "output_format", type=click.Choice(["parquet", "csv", "tsv", "jsonl", "input"])),
        opt("--chunk-rows", "chunk_rows", type=int, metavar="N"),
        opt("--batch-size", "batch_size", type=int, metavar="N"),
        opt("--batch-tokens", "batch_tokens", type=int, metavar="N"),
        opt("--max-length", "max_length", type=int, metavar="N"),
        opt("--top-k", "top_k", type=int, metavar="K"),
        opt("--threshold", "threshold", type=float, metavar="F"),
        opt("--precision", "precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"])),
        opt("--device", "device", type=click.Choice(["auto", "cpu", "cuda", "mps"])),
        click.Option(["--resume", "resume"], is_flag=True, default=None, help=f["resume"].description),
        opt("--workers", "workers", type=int, metavar="N"),
        opt("--ray-address", "ray_address", metavar="ADDRESS"),
        opt("--cpus-per-worker", "cpus_per_worker", type=float, metavar="F"),
        opt("--gpus-per-worker", "gpus_per_worker", type=float, metavar="F"),
        click.Option(["--json", "as_json"], is_flag=True, default=False, help="Print the summary as JSON."),
    ]


def commands() -> list[click.Command]:
    return [
        command(
            "predict", "Predict with a registered model (models:/NAME@ALIAS, or a version).",
            'finetune predict --registered-model imdb-sentiment-classifier "A moving, beautifully shot film."',
            [
                registered_model_option(),
                click.Option(["--alias"], metavar="ALIAS",
                             help="Registry alias (default: champion); not with --version."),
                click.Option(["--version"], type=int, metavar="N", help="Registered version; not with --alias."),
                click.Option(["--file"], metavar="FILE", help="Text file, one text per line."),
                click.Option(["--top-k", "top_k"], type=int, default=5, show_default=True, metavar="K",
                             help="Fill-mask candidates per mask."),
                click.Option(["--json", "as_json"], is_flag=True, default=False, help="Print JSON instead of a table."),
                click.Argument(["texts"], nargs=-1),
            ],
            _predict,
        ),
        command(
            "score", "Score a file, folder or glob (CSV/TSV/JSONL/Parquet) with a registered model, streaming; "
                     "on Ray with --workers or --ray-address.",
            "finetune score --registered-model imdb-sentiment-classifier --input reviews.csv --output scores.parquet",
            _score_options(),
            _score,
        ),
    ]
