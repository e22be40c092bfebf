"""The `finetune` subcommands other than the generated job commands, one module per command group, each handler
beside the click command it backs: predict.py (predict, score), registry.py (compare, promote, rollback),
sweep.py, adapt.py (adapt-then-classify), gc.py, access.py. flows/cli.py assembles them with the job commands.

A handler that runs a training, sweep or adapt-then-classify flow imports it when it runs, not at the top of its
module: flows/train.py loads MLflow (about 3 s here), which `finetune --help` and a bad flag's error do without
(every command module is loaded to build the CLI). This module holds what the
commands share: click settings, the command builder, and the filter that keeps an expected error's traceback
out of the terminal."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import click

from tasks import output
from tasks.common import ConfigError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def help_text(description: str, example: str) -> str:
    # "\b" keeps click from rewrapping the example
    return f"{description}\n\n\b\nExample:\n  {example}" if example else description


def command(name: str, description: str, example: str, params: list[click.Parameter], callback) -> click.Command:
    return click.Command(name, params=params, callback=callback, help=help_text(description, example),
                         short_help=description, context_settings=CONTEXT)


def registered_model_option() -> click.Option:
    return click.Option(["--registered-model", "registered_model"], required=True, metavar="NAME",
                        help="Model Registry name.")


class _ExpectedErrorFilter(logging.Filter):
    """Moves the traceback of Prefect's flow/task run log records of an expected error (ConfigError: bad input,
    a permission the identity lacks) into the debug log (on the terminal with --verbose): the record's one-line
    message stays, and `main` prints the `error:` line. Bugs keep their tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ConfigError) and not output.verbose():
            output.record_traceback(f"{record.name}: {record.getMessage()}\n{output.format_exception(record.exc_info[1])}")
            record.exc_info, record.exc_text = None, None
        return True


@contextlib.contextmanager
def expected_errors_without_traceback() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    f = _ExpectedErrorFilter()
    for lg in loggers:
        lg.addFilter(f)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(f)
