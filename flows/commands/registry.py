"""`finetune compare`, `promote`, `rollback`: a registered model's versions and its champion alias. The handlers are
flows/manage.py's `<command>_cli`."""
from __future__ import annotations

import argparse
from typing import Any

import click

from flows import manage
from flows.commands import command, registered_model_option


def _manage(name: str):
    def run(**kwargs: Any) -> int:
        return getattr(manage, f"{name}_cli")(argparse.Namespace(**{"version": None, **kwargs}))

    return run


def commands() -> list[click.Command]:
    return [
        command(
            "compare", "Table of a registered model's versions, metrics and aliases.",
            "finetune compare --registered-model imdb-sentiment-classifier",
            [registered_model_option(),
             click.Option(["--wide"], is_flag=True, default=False,
                          help="Every column and the full promotion notes (the default table fits 120 columns)."),
             click.Option(["--json", "as_json"], is_flag=True, default=False,
                          help="The rows as JSON (every column), for scripts.")],
            _manage("compare"),
        ),
        command(
            "promote", "Make a version the champion (a manual decision, no evaluation).",
            "finetune promote --registered-model imdb-sentiment-classifier --version 3",
            [registered_model_option(), click.Option(["--version"], type=int, required=True, metavar="N",
                                               help="Version that becomes the champion.")],
            _manage("promote"),
        ),
        command(
            "rollback", "Move the champion alias back to the version it replaced.",
            "finetune rollback --registered-model imdb-sentiment-classifier", [registered_model_option()],
            _manage("rollback"),
        ),
    ]


