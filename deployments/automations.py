"""The Prefect automation that marks zombie flow runs Crashed. A flow run whose process or machine died without a
word (kill -9, a lost node) stays Running forever; flow runs emit `prefect.flow-run.heartbeat` events every
PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (Prefect's default 180, at least 30), and this automation (Prefect's
"detect zombie flows" recipe) changes a run whose heartbeats stop for `within` seconds to CRASHED. The MLflow run of
such a run is then closed KILLED by the stale-run sweep (`finetune gc`, or the next `finetune` command).

    python deployments/automations.py                  # once per Prefect server, after `prefect deploy`
    python deployments/automations.py --within 600

`python deployments/serve.py` creates it itself. Idempotent: an automation of the same name is updated in place."""
from __future__ import annotations

import argparse
import sys
from datetime import timedelta

NAME = "finetune-flows: crash zombie flow runs"


def default_within() -> int:
    """Three missed heartbeats (with Prefect's default frequency of 180 s: 9 minutes)."""
    from prefect.settings import get_current_settings

    return 3 * max(int(get_current_settings().flows.heartbeat_frequency or 180), 30)


def zombie_automation(within_seconds: int):
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=NAME,
        description="Marks flow runs Crashed when their heartbeats stop (created by finetune-flows' deploy step).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_seconds),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"No heartbeat for {within_seconds} s: the flow run's process is gone.")],
    )


def ensure_zombie_automation(within_seconds: int | None = None) -> tuple[str, str]:
    """Creates the automation, or updates the one of the same name when it differs; returns (id, what happened:
    created, updated or unchanged)."""
    from prefect.automations import Automation

    wanted = zombie_automation(within_seconds or default_within())
    try:
        existing = Automation.read(name=NAME)
    except ValueError:  # not found
        return str(wanted.create().id), "created"
    fields = ("trigger", "actions", "enabled", "description")
    if existing.model_dump(include=set(fields)) == wanted.model_dump(include=set(fields)):
        return str(existing.id), "unchanged"
    wanted.id = existing.id
    wanted.update()
    return str(existing.id), "updated"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--within", type=int, default=None,
                    help="seconds without a heartbeat before a flow run is marked Crashed (default: 3 heartbeats)")
    args = ap.parse_args(argv)
    ident, what = ensure_zombie_automation(args.within)
    print(f"automation {NAME!r} {what} ({ident})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
