"""Serve the retraining deployments of deployments/prefect.yaml locally, schedules included, in one command and
without a work pool or worker: this process polls the Prefect API and runs each flow run in a subprocess.

    python deployments/serve.py                         # every deployment in prefect.yaml
    python deployments/serve.py --only retrain-classify # just one
    python deployments/serve.py --paused                # register them, schedules off (manual runs only)

prefect.yaml stays the one place where names, entrypoints, parameters and schedules live; this reads it.
Point PREFECT_API_URL at a running `prefect server` (otherwise Prefect starts a temporary one that goes away with
this process) and MLFLOW_TRACKING_URI at the tracking server the runs should use."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = Path(__file__).resolve().parent / "prefect.yaml"


def load_specs(prefect_file: str | Path = PREFECT_FILE, only: list[str] | None = None) -> list[dict[str, Any]]:
    """The `deployments:` entries of a prefect.yaml (anchors resolved), optionally filtered by name."""
    specs = (yaml.safe_load(Path(prefect_file).read_text()) or {}).get("deployments") or []
    if only:
        unknown = set(only) - {s["name"] for s in specs}
        if unknown:
            raise SystemExit(f"unknown deployment(s) {sorted(unknown)}: {prefect_file} has {[s['name'] for s in specs]}")
        specs = [s for s in specs if s["name"] in only]
    return specs


def _schedule(spec: dict[str, Any], paused: bool):
    from prefect.schedules import Cron, Interval

    common = dict(timezone=spec.get("timezone"), parameters=spec.get("parameters") or {}, slug=spec.get("slug"),
                  active=False if paused else spec.get("active", True))
    if "cron" in spec:
        return Cron(spec["cron"], day_or=spec.get("day_or", True), **common)
    if "interval" in spec:
        return Interval(spec["interval"], **common)
    raise ValueError(f"schedule {spec} has neither cron nor interval")


def build_deployments(specs: list[dict[str, Any]], paused: bool = False) -> list:
    """RunnerDeployments for `prefect.serve`, from prefect.yaml entries (entrypoints relative to the repo root)."""
    from prefect.flows import load_flow_from_entrypoint

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    out = []
    for spec in specs:
        path, func = spec["entrypoint"].rsplit(":", 1)
        flow = load_flow_from_entrypoint(f"{ROOT / path}:{func}")
        out.append(flow.to_deployment(
            name=spec["name"],
            description=spec.get("description"),
            tags=spec.get("tags"),
            parameters=spec.get("parameters") or {},
            schedules=[_schedule(s, paused) for s in spec.get("schedules") or []],
            concurrency_limit=spec.get("concurrency_limit"),
        ))
    return out


def check_collisions(deployments: list, replace: bool) -> None:
    """A deployment of the same name made by `prefect deploy` belongs to a work pool; serving over it would leave a
    hybrid that neither a worker nor this process can run. Stop, or with --replace delete it first."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as c:
        for d in deployments:
            full = f"{d.flow_name}/{d.name}"
            try:
                existing = c.read_deployment_by_name(full)
            except ObjectNotFound:
                continue
            if not existing.work_pool_name:
                continue
            if not replace:
                raise SystemExit(
                    f"deployment {full} already exists on work pool {existing.work_pool_name!r} (from `prefect "
                    "deploy`): run it with a worker, or pass --replace to delete it and serve it from here"
                )
            c.delete_deployment(existing.id)
            print(f"deleted work-pool deployment {full}: serving it from this process instead")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefect-file", default=str(PREFECT_FILE), help="prefect.yaml to read (default: %(default)s)")
    ap.add_argument("--only", action="append", help="serve only this deployment (repeatable)")
    ap.add_argument("--paused", action="store_true", help="create the schedules inactive: manual runs only")
    ap.add_argument("--limit", type=int, default=1, help="flow runs at once (default 1: trainings take the CPU)")
    ap.add_argument("--replace", action="store_true",
                    help="delete same-named deployments that `prefect deploy` put on a work pool, then serve")
    ap.add_argument("--crash-after", type=int, default=None, metavar="SECONDS",
                    help="mark flow runs Crashed after this long without a heartbeat (default: 3 heartbeats; "
                         "see deployments/automations.py)")
    args = ap.parse_args(argv)

    import os

    from prefect import serve

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tasks import output

    output.configure()  # flow runs (subprocesses) inherit it: no bars in their logs, no telemetry errors

    from flows.ephemeral import own_temporary_server

    own_temporary_server()  # without PREFECT_API_URL: the temporary server dies with this process

    os.chdir(ROOT)  # entrypoints are recorded relative to the repository root
    deployments = build_deployments(load_specs(args.prefect_file, args.only), paused=args.paused)
    check_collisions(deployments, args.replace)
    from deployments.automations import NAME, ensure_zombie_automation

    print(f"automation {NAME!r}: {ensure_zombie_automation(args.crash_after)[1]}")
    serve(*deployments, limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
