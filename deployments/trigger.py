"""Trigger one run of a retraining deployment through the Prefect API, with a YAML job config as its parameter.

    python deployments/trigger.py retrain-classify --config deployments/configs/quick-classify.yaml
    python deployments/trigger.py retrain-mlm --config deployments/configs/quick-mlm.yaml --wait

Without --config the deployment's own parameters apply. The config is checked here first, as `finetune` does
(YAML, keys and values, then the model, max_length and the data file, columns and labels), so a mistake is one
`error:` line and exit 2 now rather than a failed run in the worker. --no-check skips the model and data checks
(for a worker that sees other files or another network than this machine).
(`prefect deployment run FLOW/DEPLOYMENT --param config='{...}'` does the same, unchecked.)"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("deployment", help="deployment name in deployments/prefect.yaml, e.g. retrain-classify")
    ap.add_argument("--config", help="YAML job config (sections data/train/tracking) passed as the `config` parameter")
    ap.add_argument("--wait", action="store_true",
                    help="wait for the run to finish, printing its state changes, epoch lines and summary; exit 1 "
                         "unless it completed")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the model and data checks (the config's keys and values are always checked)")
    args = ap.parse_args(argv)

    from tasks import output
    from tasks.common import ConfigError

    output.configure()
    try:
        name, params = checked_parameters(args.deployment, args.config, args.check)
    except ConfigError as e:
        output.record_traceback(output.format_exception(e))
        print(f"error: {e}", file=sys.stderr)
        return 2
    return trigger(name, args.deployment, params, args.wait)


def checked_parameters(deployment: str, config: str | None, check: bool = True) -> tuple[str, dict | None]:
    """(the flow's name, the parameters to send). Every problem found without the Prefect API is a ConfigError:
    an unknown deployment, an unreadable or invalid YAML, an unknown key or bad value, and (with `check`) the model
    and data problems `finetune` finds before starting a run."""
    import typing

    from deployments.serve import load_specs
    from flows.config import build_config, read_yaml
    from flows.train import precheck
    from tasks.common import ConfigError

    try:
        spec = load_specs(only=[deployment])[0]
    except SystemExit as e:  # load_specs' own message names the deployments there are
        raise ConfigError(f"{e}: pass one of those names") from None
    path, func = spec["entrypoint"].rsplit(":", 1)
    from prefect.flows import load_flow_from_entrypoint

    flow = load_flow_from_entrypoint(f"{ROOT / path}:{func}")
    cls = typing.get_type_hints(flow.fn)["config"]  # the flow's own typed config
    params = None
    if config:
        cfg = build_config(cls, config)  # validated here; the file's values are sent (defaults resolve in the run)
        params = {"config": read_yaml(config) or {}}
    else:
        cfg = cls.model_validate((spec.get("parameters") or {}).get("config") or {})
    if check:
        precheck(cfg)
    return flow.name, params


def trigger(flow_name: str, deployment: str, params: dict | None, wait: bool) -> int:
    """Creates the flow run through the Prefect API; an API that does not answer, or a deployment it does not know,
    is one `error:` line (exit 2)."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    api = PREFECT_API_URL.value()
    if not api:
        print("error: PREFECT_API_URL is not set: point it at the Prefect server the deployments were created on "
              "(e.g. http://127.0.0.1:4200/api)", file=sys.stderr)
        return 2
    try:
        run = run_deployment(f"{flow_name}/{deployment}", parameters=params, timeout=0)
    except ObjectNotFound:
        print(f"error: deployment {flow_name}/{deployment} not found on the Prefect server {api}: create it first "
              "(`prefect deploy --all --prefect-file deployments/prefect.yaml`, or deployments/serve.py)",
              file=sys.stderr)
        return 2
    except Exception as e:
        import httpx

        if not isinstance(e, (httpx.HTTPError, OSError)):
            raise
        print(f"error: the Prefect server {api} does not answer ({type(e).__name__}): start it (`prefect server "
              "start`) or fix PREFECT_API_URL", file=sys.stderr)
        return 2
    ui = PREFECT_UI_URL.value()
    print(f"flow run {run.name} ({run.id}): {run.state.type.value if run.state else 'SCHEDULED'}"
          + (f"\n  {ui}/runs/flow-run/{run.id}" if ui else ""), flush=True)
    if not wait:
        return 0
    state = watch(str(run.id))
    return 0 if state == "COMPLETED" else 1


def is_progress(message: str, level: int) -> bool:
    """The log lines a waiting person wants: epoch lines, the summary, the promotion decision, and warnings."""
    import logging

    return level >= logging.WARNING or message.startswith(("epoch ", "== ", "promotion:", "sweep:"))


def watch(flow_run_id: str, interval: float = 2.0, out=None) -> str:
    """Follows a flow run until it ends: prints each state change (with the time since the start), its progress
    log lines (`is_progress`) as they arrive, and a last line with the final state and the whole time. Returns the
    final state type (e.g. "COMPLETED")."""
    import time

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    out = out or sys.stdout
    t0 = time.monotonic()
    last_state, seen = None, set()
    with get_client(sync_client=True) as c:

        def new_logs() -> int:
            """Prints the progress lines of logs not seen yet; returns how many logs were new. All of the run's logs
            are read each time (a late batch may hold older timestamps than lines already shown)."""
            fresh, offset = [], 0
            while True:
                page = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fr.id])),
                                   sort=LogSort.TIMESTAMP_ASC, offset=offset, limit=200)
                fresh += [log for log in page if log.id not in seen]
                offset += len(page)
                if len(page) < 200:
                    break
            for log in fresh:
                seen.add(log.id)
                if is_progress(log.message, log.level):
                    for line in log.message.splitlines():
                        print(f"  {line}", file=out, flush=True)
            return len(fresh)

        while True:
            fr = c.read_flow_run(flow_run_id)
            final = bool(fr.state and fr.state.is_final())
            if final:  # logs reach the server in batches (every 2 s), some after the final state: wait for them
                last_new, until = time.monotonic(), time.monotonic() + 30
                while time.monotonic() - last_new < 5 and time.monotonic() < until:
                    if new_logs():
                        last_new = time.monotonic()
                    time.sleep(min(interval, 1.0))
            else:
                new_logs()
            state = fr.state.name if fr.state else "Scheduled"
            if state != last_state:
                print(f"[{time.monotonic() - t0:5.0f} s] {state}", file=out, flush=True)
                last_state = state
            if final:
                break
            time.sleep(interval)
        summary = [a for a in c.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[fr.id]))) if (a.key or "").endswith("-summary")]
    for a in summary[-1:]:  # the run's markdown summary (MLflow run, version, aliases, promotion, metrics)
        for line in str(a.data).splitlines():
            if line.strip() and line.strip() not in ("| | |", "|---|---|", "|---|---|---|"):
                print(f"  {line}", file=out)
    total = (fr.end_time - fr.start_time).total_seconds() if fr.start_time and fr.end_time else None
    took = f"; {total:.0f} s of flow time" if total is not None else ""
    print(f"flow run {fr.name}: {fr.state.type.value}{took}, {time.monotonic() - t0:.0f} s waited", file=out,
          flush=True)
    return fr.state.type.value


if __name__ == "__main__":
    sys.exit(main())
