"""`finetune` command line. One subcommand per registered job; its flags are generated from the job's typed
config (flows.config.job_configs()): defaults < --config YAML < flags. Plus predict, score, compare, promote, rollback.

Built on click. The job flags come from a generic walk over the pydantic model fields (no table of flags):
- a field of a section in FLAT_SECTIONS (data, train, tracking) and a top-level field: --<field-name-kebab>;
- a field of any other section (lora): --<section>-<field-name-kebab>, e.g. --lora-r, --lora-target-modules;
- bool: --x / --no-x; Literal/Enum: a choice; list: repeat the flag or pass a comma-separated list;
  X | None: X, or `null` to unset; a single-valued Literal (the fixed `job` field) is no flag.
Only the flags the user gave become overrides for flows.config.build_config, so an absent flag never overrides
the YAML, and every config problem comes back as one `error:` message.
"""
from __future__ import annotations

import argparse
import contextlib
import enum
import json
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import click
from click.core import ParameterSource
from pydantic import BaseModel

# Sections whose fields get flat flags (the public flag names); fields of any other section are prefixed.
FLAT_SECTIONS = ("data", "train", "tracking")
NULL = "null"  # the YAML spelling of None; an optional field's flag takes it to unset the field

HELP = (
    "Fine-tune transformer models as Prefect flows, tracked and registered in MLflow.\n\n"
    "Each job's flags come from its typed config: built-in defaults < --config YAML < flags. "
    "`finetune JOB --help` lists them with their defaults."
)
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


# --- types: pydantic annotation -> click parameter type ------------------------------------------------------


class _Optional(click.ParamType):
    """`X | None`: a value of X, or `null` for None."""

    def __init__(self, inner: click.ParamType):
        self.inner = inner
        self.name = inner.name

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip().lower() == NULL:
            return None
        return self.inner.convert(value, param, ctx)


class _CommaList(click.ParamType):
    """One occurrence of a list flag: comma-separated values, each converted by the element type."""

    name = "list"

    def __init__(self, inner: click.ParamType):
        self.inner = inner

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        return [self.inner.convert(v.strip(), param, ctx) for v in str(value).split(",") if v.strip()]


class _Mapped(click.Choice):
    """Literal/Enum choices: the user types str(value), the config gets the value itself."""

    def __init__(self, values: list[Any]):
        self.values = {str(getattr(v, "value", v)): v for v in values}
        super().__init__(list(self.values))

    def convert(self, value, param, ctx):
        return self.values[super().convert(value, param, ctx)]


class _YAMLValue(click.ParamType):
    """Fallback for any other type (dict, nested union...): the value is read as YAML; pydantic validates it."""

    name = "yaml"

    def convert(self, value, param, ctx):
        import yaml

        try:
            return yaml.safe_load(value) if isinstance(value, str) else value
        except yaml.YAMLError as e:
            self.fail(f"{value!r} is not valid YAML: {e}", param, ctx)


_SCALARS: dict[Any, click.ParamType] = {int: click.INT, float: click.FLOAT, str: click.STRING, Path: click.STRING}


def _strip_optional(ann: Any) -> tuple[Any, bool]:
    if typing.get_origin(ann) in (Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(ann))
    return ann, False


def _strip_annotated(ann: Any) -> Any:
    while typing.get_origin(ann) is typing.Annotated:
        ann = typing.get_args(ann)[0]
    return ann


def _is_fixed(ann: Any) -> bool:
    """A single-valued Literal (e.g. `job: Literal["classify"]`) is fixed by the job: no flag."""
    ann = _strip_annotated(ann)
    return typing.get_origin(ann) is Literal and len(typing.get_args(ann)) == 1


def _click_type(ann: Any) -> tuple[click.ParamType | None, bool]:
    """(click type, is a list); type None means a bool flag pair."""
    ann, optional = _strip_optional(_strip_annotated(ann))
    ann = _strip_annotated(ann)
    origin = typing.get_origin(ann)
    is_list = False
    if origin in (list, tuple, set, frozenset) or ann in (list, tuple, set, frozenset):
        args = [a for a in typing.get_args(ann) if a is not Ellipsis]
        ann, is_list = (_strip_annotated(args[0]) if len(set(args)) == 1 else str), True
        origin = typing.get_origin(ann)
    if ann is bool and not optional and not is_list:
        return None, False
    if origin is Literal:
        t: click.ParamType = _Mapped(list(typing.get_args(ann)))
    elif isinstance(ann, type) and issubclass(ann, enum.Enum):
        t = _Mapped(list(ann))
    elif ann is bool:
        t = click.BOOL
    else:
        t = _SCALARS.get(ann) or _YAMLValue()
    if is_list:
        t = _CommaList(t)
    if optional:
        t = _Optional(t)
    return t, is_list


# --- the generated job subcommands ----------------------------------------------------------------------------


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _show(value: Any, is_bool: bool = False) -> str:
    if value is None:
        return NULL
    if is_bool:
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(getattr(value, "value", value))


class _FieldOption(click.Option):
    """A click option that knows the config path it sets and the help section it is listed under."""

    def __init__(self, *args, path: tuple[str, ...] = (), section: str = "Options", **kwargs):
        super().__init__(*args, **kwargs)
        self.path = path
        self.section = section


def _field_options(cls: type[BaseModel]) -> list[click.Option]:
    """One option per config field, in model order: top-level fields first, then each section."""
    shown = cls().model_dump()  # defaults of an all-default config: what the job really uses
    top: list[click.Option] = []
    sections: list[click.Option] = []
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if _is_fixed(ann):
            continue
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            prefix = "" if name in FLAT_SECTIONS else f"{_kebab(name)}-"
            title = f"{name} options (YAML section `{name}`)"
            for sub_name, sub_field in ann.model_fields.items():
                if _is_fixed(sub_field.annotation):
                    continue
                sections.append(
                    _option(f"--{prefix}{_kebab(sub_name)}", (name, sub_name), sub_field, shown[name][sub_name], title)
                )
        else:
            top.append(_option(f"--{_kebab(name)}", (name,), field, shown[name], "job options (YAML top level)"))
    return top + sections


def _option(flag: str, path: tuple[str, ...], field, default: Any, section: str) -> click.Option:
    ptype, is_list = _click_type(field.annotation)
    desc = (field.description or "").strip()
    dest = "__".join(path)
    if ptype is None:  # bool: --x / --no-x
        no_flag = f"--no-{flag[2:]}"
        return _FieldOption([f"{flag}/{no_flag}", dest], default=None, path=path, section=section,
                            help=f"{desc}  [default: {_show(default, is_bool=True)}]")
    metavar = None if isinstance(ptype, click.Choice) else _metavar(ptype, is_list)
    extra = "  Repeat the flag or separate values with commas." if is_list else ""
    return _FieldOption([flag, dest], type=ptype, multiple=is_list, default=None, metavar=metavar,
                        help=f"{desc}{extra}  [default: {_show(default)}]", path=path, section=section)


def _metavar(ptype: click.ParamType, is_list: bool) -> str:
    inner = ptype.inner if isinstance(ptype, _Optional) else ptype
    inner = inner.inner if isinstance(inner, _CommaList) else inner
    if isinstance(inner, click.Choice):
        word = "|".join(inner.choices)
    else:
        word = {"integer": "N", "float": "F", "text": "TEXT", "boolean": "BOOL"}.get(inner.name, "VALUE")
    if is_list:
        word = f"{word}[,{word}...]"
    return f"{word}|{NULL}" if isinstance(ptype, _Optional) else word


class _JobCommand(click.Command):
    """Lists the generated flags grouped by config section."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        for p in self.get_params(ctx):
            rec = p.get_help_record(ctx)
            if rec:
                groups.setdefault(getattr(p, "section", "Options"), []).append(rec)
        for title, rows in groups.items():
            with formatter.section(title[:1].upper() + title[1:]):
                formatter.write_dl(rows)


def _help_text(description: str, example: str) -> str:
    # "\b" keeps click from rewrapping the example
    return f"{description}\n\n\b\nExample:\n  {example}" if example else description


def overrides_from(ctx: click.Context, params: list[click.Option]) -> dict:
    """Nested overrides dict of exactly the flags given on the command line."""
    out: dict = {}
    for p in params:
        if not isinstance(p, _FieldOption) or ctx.get_parameter_source(p.name) != ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[p.name]
        if p.multiple:  # `null` (an optional list: e.g. --lora-target-modules null = the architecture's default)
            value = None if any(chunk is None for chunk in value) else [v for chunk in value for v in chunk]
        node = out
        for key in p.path[:-1]:
            node = node.setdefault(key, {})
        node[p.path[-1]] = value
    return out


def job_command(job: str, cls: type[BaseModel]) -> click.Command:
    """The `finetune <job>` subcommand, generated from the job's config class."""
    fields = _field_options(cls)
    params: list[click.Parameter] = [
        click.Option(["--config", "config"], metavar="FILE.yaml", default=None,
                     help="YAML file with the config sections (data, train, tracking, lora, top-level fields); "
                          "flags override it."),
        *fields,
        click.Option(["--json", "as_json"], is_flag=True, default=False,
                     help="Print the flow's result as JSON at the end."),
    ]
    flags = [o for p in params for o in p.opts + p.secondary_opts] + CONTEXT["help_option_names"]
    dupes = sorted({f for f in flags if flags.count(f) > 1})
    if dupes:
        raise RuntimeError(f"{cls.__name__}: config fields generate clashing flags {dupes}: rename a field")

    def run(config: str | None, as_json: bool, **_: Any) -> int:
        from flows import train
        from flows.config import build_config

        from tasks import tracking

        ctx = click.get_current_context()
        cfg = build_config(cls, config, overrides_from(ctx, fields))
        from flows.ephemeral import begin_temporary_server

        begin_temporary_server()  # no PREFECT_API_URL: Prefect's temporary server boots while the checks run
        tracking.check_remote()  # server down or credentials refused: one error line, before Prefect starts
        train.precheck(cfg)  # model, max_length, data file, columns, labels: found before Prefect starts
        with expected_errors_without_traceback():
            result = train.run_job(cfg)
        if as_json:
            print(json.dumps(result, indent=2, default=str))
        return 0

    description = getattr(cls, "description", "") or (cls.__doc__ or job).strip().splitlines()[0]
    return _JobCommand(job, params=params, callback=run, short_help=description, context_settings=CONTEXT,
                       help=_help_text(description, getattr(cls, "example", "")))


# --- the other subcommands ------------------------------------------------------------------------------------


def _registered_model() -> click.Option:
    return click.Option(["--registered-model", "registered_model"], required=True, metavar="NAME",
                        help="Model Registry name.")


def _predict(registered_model: str, alias: str | None, version: int | None, file: str | None, top_k: int,
             as_json: bool, texts: tuple[str, ...]) -> int:
    if alias is not None and version is not None:
        raise click.UsageError("--alias and --version are mutually exclusive: pass one of them")
    from flows.config import ConfigError
    from tasks.predict import format_predictions, predict
    from tasks.registry import model_uri

    texts_ = list(texts)
    if file:
        f = Path(file)
        if not f.is_file():
            raise ConfigError(f"--file {file!r} not found: pass a text file with one text per line")
        try:
            texts_ += [ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError as e:
            raise ConfigError(f"--file {file!r} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from None
    from tasks.tracking import check_remote

    check_remote()
    results = predict(model_uri(registered_model, alias, version), texts_, top_k)
    print(json.dumps(results, indent=2) if as_json else format_predictions(results))
    return 0


def _score(as_json: bool, **kwargs: Any) -> int:
    """`finetune score`: the plain streaming job in this process (no Prefect server to start); the nightly
    deployment runs the same functions as the `score` flow (flows/score.py)."""
    from flows.config import ConfigError
    from tasks import scoring
    from tasks.tracking import check_remote

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
    check_remote()
    summary = scoring.score(cfg, progress=_progress_line())
    print(json.dumps(summary, indent=2, default=str) if as_json else scoring.format_summary(summary))
    return 0


def _progress_line():
    """rows done / total on stderr, one line per chunk (a few per second at most)."""
    last = [0.0]

    def show(done: int, total: int) -> None:
        import time

        now = time.time()
        if done == total or now - last[0] > 2:
            last[0] = now
            print(f"scored {done:,} / {total:,} rows", file=sys.stderr, flush=True)

    return show


def _score_options() -> list[click.Parameter]:
    from tasks.scoring import ScoreConfig

    f = ScoreConfig.model_fields

    def opt(flag: str, name: str, **kw) -> click.Option:
        d = f[name].get_default(call_default_factory=True)
        shown = f"  [default: {d}]" if d not in (None, [], False) and not f[name].is_required() else ""
        return click.Option([flag, name], help=(f[name].description or "").replace(
            "not with alias", "not with --alias").replace("not with version", "not with --version") + shown, **kw)

    return [
        _registered_model(),
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


def _manage(command: str):
    def run(**kwargs: Any) -> int:
        from flows import manage

        return getattr(manage, f"{command}_cli")(argparse.Namespace(**{"version": None, **kwargs}))

    return run


def _command(name: str, description: str, example: str, params: list[click.Parameter], callback) -> click.Command:
    return click.Command(name, params=params, callback=callback, help=_help_text(description, example),
                         short_help=description, context_settings=CONTEXT)


def other_commands() -> list[click.Command]:
    return [
        _command(
            "predict", "Predict with a registered model (models:/NAME@ALIAS, or a version).",
            'finetune predict --registered-model imdb-sentiment-classifier "A moving, beautifully shot film."',
            [
                _registered_model(),
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
        _command(
            "score", "Score a file, folder or glob (CSV/TSV/JSONL/Parquet) with a registered model, streaming; "
                     "on Ray with --workers or --ray-address.",
            "finetune score --registered-model imdb-sentiment-classifier --input reviews.csv --output scores.parquet",
            _score_options(),
            _score,
        ),
        _command(
            "compare", "Table of a registered model's versions, metrics and aliases.",
            "finetune compare --registered-model imdb-sentiment-classifier",
            [_registered_model(),
             click.Option(["--wide"], is_flag=True, default=False,
                          help="Every column and the full promotion notes (the default table fits 120 columns)."),
             click.Option(["--json", "as_json"], is_flag=True, default=False,
                          help="The rows as JSON (every column), for scripts.")],
            _manage("compare"),
        ),
        _command(
            "promote", "Make a version the champion (a manual decision, no evaluation).",
            "finetune promote --registered-model imdb-sentiment-classifier --version 3",
            [_registered_model(), click.Option(["--version"], type=int, required=True, metavar="N",
                                               help="Version that becomes the champion.")],
            _manage("promote"),
        ),
        _command(
            "rollback", "Move the champion alias back to the version it replaced.",
            "finetune rollback --registered-model imdb-sentiment-classifier", [_registered_model()],
            _manage("rollback"),
        ),
    ]


def _sweep(config: str, ray_address: str | None, max_concurrent: int | None, max_trials: int | None,
           resume: bool, as_json: bool) -> int:
    from flows.sweep import load_sweep, sweep_flow
    from tasks import tracking

    from flows.train import precheck

    sweep = load_sweep(config, {"ray_address": ray_address, "max_concurrent": max_concurrent,
                                "max_trials": max_trials, "resume": resume or None})  # checked before Ray or Prefect
    from flows.ephemeral import begin_temporary_server

    begin_temporary_server()  # boots while the trials' models and data are checked
    tracking.check_remote()
    from flows.sweep import trial_configs

    checked: set[str] = set()
    for _, cfg in trial_configs(sweep):  # model, data, labels: found before Prefect and Ray start
        key = cfg.model_dump_json(include={"data": True, "train": {"model"}})
        if key not in checked:
            checked.add(key)
            precheck(cfg)
    from flows.ephemeral import own_temporary_server

    own_temporary_server()  # no PREFECT_API_URL: the temporary server dies with this command (kill -9 included)
    with expected_errors_without_traceback():
        result = sweep_flow(sweep)
    result["command_seconds"] = round(_process_seconds(), 1)  # what the person waited, imports included
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(sweep_text(result))
    return 0


def _process_seconds() -> float:
    import time

    import psutil

    return time.time() - psutil.Process().create_time()


def sweep_text(r: dict) -> str:
    """The sweep's table and outcome, for the terminal."""
    key = r["metric"]
    names = [k for k in r["trials"][0] if k not in ("trial", "run_id", "status", "seconds", "error", "epochs_trained",
                                                    "pruned_at_epoch")
             and not k.startswith(("eval_", "train_", "perplexity"))] if r["trials"] else []
    whole = f"{r['command_seconds']:.0f} s for the command, " if r.get("command_seconds") else ""
    pruned = f"{r['pruned']} pruned, " if r.get("pruned") else ""
    lines = [f"== sweep finished: {len(r['trials'])} trials, {pruned}{r['failed']} failed, {whole}{r['wall_seconds']:.0f} s "
             f"for the sweep flow, {r.get('trials_seconds', 0):.0f} s of it the trials ==",
             "  " + "  ".join(f"{h:>14}" for h in ["trial", *names, key, "seconds", "epochs", "status"])]
    for t in r["trials"]:
        score = t.get(key)
        cells = [t["trial"], *(t.get(n) for n in names), f"{score:.4f}" if isinstance(score, float) else "-",
                 f"{t['seconds']:.0f}", t.get("epochs_trained", "-"),
                 t["status"] + (" *" if t["trial"] == r["best_trial"] else "")]
        lines.append("  " + "  ".join(f"{c:>14}" if not isinstance(c, float) else f"{c:>14.4g}" for c in cells))
    lines.append(f"  MLflow parent run      {r['parent_run_id']}")
    if r.get("study"):
        lines.append(f"  Optuna study           {r['study']} ({r.get('study_finished_trials', 0)} finished trials)")
    if r.get("version"):
        lines.append(f"  best trial {r['best_trial']} registered as version {r['version']}: {r['decision']}")
    return "\n".join(lines)


def sweep_command() -> click.Command:
    return _command(
        "sweep", "Hyper-parameter sweep on Ray: trials as Prefect tasks, nested MLflow runs, the best one registered.",
        "finetune sweep --config deployments/sweep.yaml",
        [
            click.Option(["--config"], required=True, metavar="SWEEP.yaml",
                         help="The sweep: job, base config, method (grid/random/tpe), parameters, pruner, metric, max_trials "
                              "(see flows/sweep.py and deployments/sweep.yaml)."),
            click.Option(["--ray-address"], metavar="ADDRESS",
                         help="A running Ray cluster (e.g. ray://head:10001); default: a local Ray for this sweep."),
            click.Option(["--max-concurrent"], type=int, metavar="N", help="Trials at the same time (overrides the file)."),
            click.Option(["--max-trials"], type=int, metavar="N", help="Trial budget (overrides the file)."),
            click.Option(["--resume"], is_flag=True, default=False,
                         help="Add trials to the last study of this search (its finished trials are not trained "
                              "again); as `resume: true` in the file."),
            click.Option(["--json", "as_json"], is_flag=True, default=False, help="Print the result as JSON."),
        ],
        _sweep,
    )


def _adapt_then_classify(config: str | None, as_json: bool) -> int:
    from flows.adapt_then_classify import AdaptThenClassifyConfig, adapt_then_classify_flow, precheck
    from flows.config import build_config
    from flows.ephemeral import begin_temporary_server, own_temporary_server
    from tasks import tracking

    cfg = build_config(AdaptThenClassifyConfig, config)
    begin_temporary_server()
    tracking.check_remote()
    precheck(cfg)  # both steps' models and data, before Prefect starts
    own_temporary_server()
    with expected_errors_without_traceback():
        result = adapt_then_classify_flow(cfg)
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    return 0


def adapt_then_classify_command() -> click.Command:
    return _command(
        "adapt-then-classify", "Domain adaptation (mlm) then classification from the adapted version, one flow run.",
        "finetune adapt-then-classify --config adapt.yaml",
        [click.Option(["--config"], metavar="FILE.yaml", default=None,
                      help="YAML with sections `mlm` and `classify` (each a job config, as for `finetune mlm` / "
                           "`finetune classify`) and `require_floor`; default: both jobs' defaults."),
         click.Option(["--json", "as_json"], is_flag=True, default=False, help="Print the result as JSON.")],
        _adapt_then_classify,
    )


def _gc(**kwargs: Any) -> int:
    from flows.gc import gc_cli

    return gc_cli(**kwargs)


def gc_command() -> click.Command:
    return _command(
        "gc", "Free disk: what finished, failed and orphaned runs left, stale caches and runs, old model versions.",
        "finetune gc --keep-versions 5 --yes",
        [click.Option(["--output-dir", "output_dirs"], multiple=True, metavar="DIR",
                      help="Training output dir to clean (repeatable; default: outputs/ of this checkout)."),
         click.Option(["--cache-dir", "cache_dir"], metavar="DIR",
                      help="Prepared-dataset cache (default: FINETUNE_CACHE_DIR or .cache/)."),
         click.Option(["--cache-days", "cache_days"], type=float, default=30.0, show_default=True, metavar="DAYS",
                      help="Remove cache entries unused for this long (they are rebuilt when needed)."),
         click.Option(["--keep-versions", "keep_versions"], type=int, default=10, show_default=True, metavar="N",
                      help="Per registered model, keep the newest N versions; older ones without an alias are "
                           "deleted with their logged model. Versions with an alias are always kept."),
         click.Option(["--registered-model", "registered_models"], multiple=True, metavar="NAME",
                      help="Limit version retention to this model (repeatable; default: every model finetune "
                           "registered)."),
         click.Option(["--grace-days", "grace_days"], type=float, default=None, metavar="DAYS",
                      help="A run dir whose run this store does not hold is touched only when its own record "
                           "(run.json) says its process is dead and was last seen this long ago (default 7, "
                           "FINETUNE_GC_GRACE_DAYS)."),
         click.Option(["--yes", "yes"], is_flag=True, default=False,
                      help="Apply. Without it gc only prints what it would do (a dry run).")],
        _gc,
    )


# --- finetune access: users and permissions on an authenticated MLflow server ------------------------------------


def _access_create_user(user: str, password_file: str | None) -> int:
    from tasks import access

    password = access.password_from(password_file)
    if password is None:
        if not sys.stdin.isatty():
            raise click.UsageError("no password: pass --password-file FILE or set MLFLOW_NEW_USER_PASSWORD")
        password = click.prompt(f"password for {user}", hide_input=True, confirmation_prompt=True)
    access.create_user(user, password)
    print(f"created MLflow user {user}")
    return 0


def _access_grant(user: str, registered_model: str | None, experiment: str | None, permission: str) -> int:
    from tasks import access

    for line in access.grant(user, permission, registered_model=registered_model, experiment=experiment):
        print(f"granted {line}")
    return 0


def access_group() -> click.Group:
    user = click.Option(["--user"], required=True, metavar="USER", help="MLflow user name.")
    create = _command(
        "create-user", "Create an MLflow user (run as an admin).",
        "finetune access create-user --user trainer --password-file trainer.pw",
        [user, click.Option(["--password-file", "password_file"], metavar="FILE",
                            help="File whose first line is the password (else MLFLOW_NEW_USER_PASSWORD, else a "
                                 "prompt). Never on the command line.")],
        _access_create_user,
    )
    grant = _command(
        "grant", "Grant a user READ, EDIT or MANAGE on a registered model and/or an experiment.",
        "finetune access grant --user trainer --registered-model imdb-sentiment-classifier --permission MANAGE",
        [user,
         click.Option(["--registered-model", "registered_model"], metavar="NAME",
                      help="Model Registry name (created, empty, when missing)."),
         click.Option(["--experiment"], metavar="NAME", help="Experiment name (created when missing)."),
         click.Option(["--permission"], required=True, type=click.Choice(
             ["READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS"], case_sensitive=False),
             help="READ: see and load; EDIT: create runs, versions and move aliases; MANAGE: also delete "
                  "(an alias) and grant to others.")],
        _access_grant,
    )
    return click.Group(
        "access", commands={"create-user": create, "grant": grant}, context_settings=CONTEXT,
        help="Users and permissions on an MLflow server started with MLFLOW_AUTH=basic (see mlflow/README.md). "
             "Run as an admin: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.",
        short_help="Users and permissions on an authenticated MLflow server.",
    )


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # jobs first, in registry order


def build_cli() -> click.Group:
    from flows.config import job_configs

    commands = [job_command(job, cls) for job, cls in job_configs().items()] + other_commands() + [sweep_command(),
                                                                                                   access_group()]
    commands.append(gc_command())
    commands.append(adapt_then_classify_command())
    verbose = click.Option(["--verbose", "-v"], is_flag=True, default=False,
                           help="Show the libraries' own logs, and the traceback of an error on the terminal (else "
                                "it goes to the debug log, .cache/logs/finetune-debug.log). Also FINETUNE_VERBOSE=1.")
    return _Group("finetune", commands={c.name: c for c in commands}, help=HELP, params=[verbose],
                  callback=_set_verbose, context_settings=CONTEXT)


def _set_verbose(verbose: bool) -> None:
    """`finetune --verbose`: `main` has read it already (output is configured before any command runs)."""
    import os

    if verbose:
        os.environ["FINETUNE_VERBOSE"] = "1"


class _ExpectedErrorFilter(logging.Filter):
    """Moves the traceback of Prefect's flow/task run log records of an expected error (ConfigError: bad input,
    a permission the identity lacks) into the debug log (on the terminal with --verbose): the record's one-line
    message stays, and `main` prints the `error:` line. Bugs keep their tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        from tasks import output
        from tasks.common import ConfigError

        if record.exc_info and isinstance(record.exc_info[1], ConfigError) and not output.verbose():
            output.record_traceback(f"{record.name}: {record.getMessage()}\n{output.format_exception(record.exc_info[1])}")
            record.exc_info, record.exc_text = None, None
        return True


@contextlib.contextmanager
def expected_errors_without_traceback():
    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    f = _ExpectedErrorFilter()
    for lg in loggers:
        lg.addFilter(f)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(f)


def _expected(e: BaseException) -> None:
    """An expected error's traceback: on the terminal with --verbose, else in the debug log."""
    from tasks import output

    if output.verbose():
        print(output.format_exception(e), file=sys.stderr, end="")
    else:
        output.record_traceback(output.format_exception(e))


def main(argv: list[str] | None = None) -> int:
    import os

    from flows.config import ConfigError
    from tasks import output

    leading = list(sys.argv[1:] if argv is None else argv)[:1]
    if leading and leading[0] in ("--verbose", "-v"):  # before anything is configured (the group option says so)
        os.environ["FINETUNE_VERBOSE"] = "1"
    output.configure()
    cli = build_cli()
    try:
        rv = cli.main(args=argv, prog_name="finetune", standalone_mode=False)
    except click.exceptions.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `finetune`: its help, as argparse's usage error did
            print(e.format_message(), file=sys.stderr)
            return 2
        where = e.ctx.command_path if e.ctx else "finetune"
        print(f"error: {e.format_message()} (see: {where} --help)", file=sys.stderr)
        return 2
    except click.exceptions.ClickException as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        return e.exit_code
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except ConfigError as e:
        _expected(e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from tasks import tracking

        if not tracking.auth_status(e):  # anything else is a bug: its traceback
            raise
        # a refusal by the tracking server that no command mapped to the permission it needs: still one line
        _expected(e)
        print(f"error: {tracking.access_denied(e, 'the needed', 'this resource')}", file=sys.stderr)
        return 2
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
