"""Trigger one run of a retraining deployment through the Prefect API, with a YAML job config as its parameter.

    python deployments/trigger.py retrain-classify --config deployments/configs/quick-classify.yaml
    python deployments/trigger.py retrain-mlm --config deployments/configs/quick-mlm.yaml --wait

Without --config the deployment's own parameters apply. The config is validated here first, so a typo fails now
rather than in the worker. (`prefect deployment run FLOW/DEPLOYMENT --param config='{...}'` does the same.)"""
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
    args = ap.parse_args(argv)

    import typing

    from deployments.serve import load_specs
    from flows.config import ConfigError, build_config

    spec = load_specs(only=[args.deployment])[0]
    path, func = spec["entrypoint"].rsplit(":", 1)
    from prefect.flows import load_flow_from_entrypoint

    flow = load_flow_from_entrypoint(f"{ROOT / path}:{func}")
    params = None
    if args.config:
        cls = typing.get_type_hints(flow.fn)["config"]  # the flow's own typed config
        try:
            build_config(cls, args.config)  # validate here; send the file's values (defaults resolve in the run)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        import yaml

        params = {"config": yaml.safe_load(Path(args.config).read_text()) or {}}

    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_UI_URL

    run = run_deployment(f"{flow.name}/{args.deployment}", parameters=params, timeout=None if args.wait else 0)
    ui = PREFECT_UI_URL.value()
    print(f"flow run {run.name} ({run.id}): {run.state.type.value if run.state else 'SCHEDULED'}"
          + (f"\n  {ui}/runs/flow-run/{run.id}" if ui else ""))
    return 0 if not args.wait or (run.state and run.state.is_completed()) else 1


if __name__ == "__main__":
    sys.exit(main())
