"""`finetune` command line. One subcommand per registered job; its flags are generated from the job's typed
config (flows.config.job_configs()): defaults < --config YAML < flags. The other commands (predict, score, compare,
promote, rollback, sweep, access, gc, adapt-then-classify) live in flows/commands/, one module per command group.

Built on click. The job flags come from a generic walk over the pydantic model fields (no table of flags):
- a field of a section in FLAT_SECTIONS (data, train, tracking) and a top-level field: --<field-name-kebab>;
- a field of any other section (lora): --<section>-<field-name-kebab>, e.g. --lora-r, --lora-target-modules;
- bool: --x / --no-x; Literal/Enum: a choice; list: repeat the flag or pass a comma-separated list;
  X | None: X, or `null` to unset; a single-valued Literal (the fixed `job` field) is no flag.
Only the flags the user gave become overrides for flows.config.build_config, so an absent flag never overrides
the YAML, and every config problem comes back as one `error:` message.
"""
from __future__ import annotations

import os
import sys
import typing
from typing import Any, Literal

import click
from click.core import ParameterSource
from pydantic import BaseModel

from flows import config as configs
from flows.commands import CONTEXT, access, adapt, gc, help_text, predict, registry, sweep, train
from flows.commands.fieldtypes import click_type, metavar_for, show, strip_annotated
from tasks import output, tracking
from tasks.common import ConfigError

# Sections whose fields get flat flags (the public flag names); fields of any other section are prefixed.
FLAT_SECTIONS = ("data", "train", "tracking")

HELP = (
    "Fine-tune transformer models as Prefect flows, tracked and registered in MLflow.\n\n"
    "Each job's flags come from its typed config: built-in defaults < --config YAML < flags. "
    "`finetune JOB --help` lists them with their defaults."
)


def _is_fixed(ann: Any) -> bool:
    """A single-valued Literal (e.g. `job: Literal["classify"]`) is fixed by the job: no flag."""
    ann = strip_annotated(ann)
    return typing.get_origin(ann) is Literal and len(typing.get_args(ann)) == 1


# --- the generated job subcommands ----------------------------------------------------------------------------


def _kebab(name: str) -> str:
    return name.replace("_", "-")


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
    ptype, is_list = click_type(field.annotation)
    desc = (field.description or "").strip()
    dest = "__".join(path)
    if ptype is None:  # bool: --x / --no-x
        no_flag = f"--no-{flag[2:]}"
        return _FieldOption([f"{flag}/{no_flag}", dest], default=None, path=path, section=section,
                            help=f"{desc}  [default: {show(default, is_bool=True)}]")
    mv = None if isinstance(ptype, click.Choice) else metavar_for(ptype, is_list)
    extra = "  Repeat the flag or separate values with commas." if is_list else ""
    return _FieldOption([flag, dest], type=ptype, multiple=is_list, default=None, metavar=mv,
                        help=f"{desc}{extra}  [default: {show(default)}]", path=path, section=section)


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
        return train.run(cls, config, overrides_from(click.get_current_context(), fields), as_json)

    description = getattr(cls, "description", "") or (cls.__doc__ or job).strip().splitlines()[0]
    return _JobCommand(job, params=params, callback=run, short_help=description, context_settings=CONTEXT,
                       help=help_text(description, getattr(cls, "example", "")))


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # jobs first, in registry order


def build_cli() -> click.Group:
    """The job commands (generated, in registry order), then each command group's (flows/commands/)."""
    commands = [job_command(job, cls) for job, cls in configs.job_configs().items()]
    for group in (predict, registry, sweep, access, gc, adapt):
        commands += group.commands()
    verbose = click.Option(["--verbose", "-v"], is_flag=True, default=False,
                           help="Show the libraries' own logs, and the traceback of an error on the terminal (else "
                                "it goes to the debug log, .cache/logs/finetune-debug.log). Also FINETUNE_VERBOSE=1.")
    return _Group("finetune", commands={c.name: c for c in commands}, help=HELP, params=[verbose],
                  callback=_set_verbose, context_settings=CONTEXT)


def _set_verbose(verbose: bool) -> None:
    """`finetune --verbose`: `main` has read it already (output is configured before any command runs)."""
    if verbose:
        os.environ["FINETUNE_VERBOSE"] = "1"


def _expected(e: BaseException) -> None:
    """An expected error's traceback: on the terminal with --verbose, else in the debug log."""
    if output.verbose():
        print(output.format_exception(e), file=sys.stderr, end="")
    else:
        output.record_traceback(output.format_exception(e))


def main(argv: list[str] | None = None) -> int:
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
        if not tracking.auth_status(e):  # anything else is a bug: its traceback
            raise
        # a refusal by the tracking server that no command mapped to the permission it needs: still one line
        _expected(e)
        print(f"error: {tracking.access_denied(e, 'the needed', 'this resource')}", file=sys.stderr)
        return 2
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
