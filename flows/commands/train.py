"""`finetune <job>`: the generated job commands' handler (flows/cli.py builds their flags): the config from
defaults < YAML < flags, the checks that need no Prefect, then the job's training flow (flows/train.py)."""
from __future__ import annotations

import json

from flows import config as configs
from flows.commands import expected_errors_without_traceback
from flows.ephemeral import begin_temporary_server
from tasks import tracking


def run(cls: type[configs.JobConfig], config: str | None, overrides: dict, as_json: bool) -> int:
    from flows import train  # loads MLflow: when the command runs (see flows/commands/__init__.py)

    cfg = configs.build_config(cls, config, overrides)
    begin_temporary_server()  # no PREFECT_API_URL: Prefect's temporary server boots while the checks run
    tracking.check_remote()  # server down or credentials refused: one error line, before Prefect starts
    train.precheck(cfg)  # model, max_length, data file, columns, labels: found before Prefect starts
    with expected_errors_without_traceback():
        result = train.run_job(cfg)
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    return 0
