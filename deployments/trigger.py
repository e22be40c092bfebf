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
    ap.add_argument("--wait", action="store_true", help="wait for the run to finish; exit 1 unless it completed")
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
        run = run_deployment(f"{flow_name}/{deployment}", parameters=params, timeout=None if wait else 0)
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
          + (f"\n  {ui}/runs/flow-run/{run.id}" if ui else ""))
    return 0 if not wait or (run.state and run.state.is_completed()) else 1


if __name__ == "__main__":
    sys.exit(main())
