"""`finetune access`: users and permissions on an MLflow server started with MLFLOW_AUTH=basic (tasks/access.py)."""
from __future__ import annotations

import sys

import click

from flows.commands import CONTEXT, command
from tasks import access


def _access_create_user(user: str, password_file: str | None) -> int:
    password = access.password_from(password_file)
    if password is None:
        if not sys.stdin.isatty():
            raise click.UsageError("no password: pass --password-file FILE or set MLFLOW_NEW_USER_PASSWORD")
        password = click.prompt(f"password for {user}", hide_input=True, confirmation_prompt=True)
    access.create_user(user, password)
    print(f"created MLflow user {user}")
    return 0


def _access_grant(user: str, registered_model: str | None, experiment: str | None, permission: str) -> int:
    for line in access.grant(user, permission, registered_model=registered_model, experiment=experiment):
        print(f"granted {line}")
    return 0


def commands() -> list[click.Command]:
    user = click.Option(["--user"], required=True, metavar="USER", help="MLflow user name.")
    create = command(
        "create-user", "Create an MLflow user (run as an admin).",
        "finetune access create-user --user trainer --password-file trainer.pw",
        [user, click.Option(["--password-file", "password_file"], metavar="FILE",
                            help="File whose first line is the password (else MLFLOW_NEW_USER_PASSWORD, else a "
                                 "prompt). Never on the command line.")],
        _access_create_user,
    )
    grant = command(
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
    return [click.Group(
        "access", commands={"create-user": create, "grant": grant}, context_settings=CONTEXT,
        help="Users and permissions on an MLflow server started with MLFLOW_AUTH=basic (see mlflow/README.md). "
             "Run as an admin: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.",
        short_help="Users and permissions on an authenticated MLflow server.",
    )]
