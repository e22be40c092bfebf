"""`finetune adapt-then-classify`: domain adaptation (mlm) then classification, one flow run
(flows/adapt_then_classify.py)."""
from __future__ import annotations

import json

import click

from flows.commands import command, expected_errors_without_traceback
from flows.config import build_config
from flows.ephemeral import begin_temporary_server, own_temporary_server
from tasks import tracking


def _adapt_then_classify(config: str | None, as_json: bool) -> int:
    # the flow loads MLflow and the training flow: when the command runs (see flows/commands/__init__.py)
    from flows.adapt_then_classify import AdaptThenClassifyConfig, adapt_then_classify_flow, precheck

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


def commands() -> list[click.Command]:
    return [command(
        "adapt-then-classify", "Domain adaptation (mlm) then classification from the adapted version, one flow run.",
        "finetune adapt-then-classify --config adapt.yaml",
        [click.Option(["--config"], metavar="FILE.yaml", default=None,
                      help="YAML with sections `mlm` and `classify` (each a job config, as for `finetune mlm` / "
                           "`finetune classify`) and `require_floor`; default: both jobs' defaults."),
         click.Option(["--json", "as_json"], is_flag=True, default=False, help="Print the result as JSON.")],
        _adapt_then_classify,
    )]
