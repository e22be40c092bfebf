"""`finetune sweep`: a hyper-parameter sweep on Ray (flows/sweep.py), its trials' configs checked before Prefect and
Ray start, and its table for the terminal."""
from __future__ import annotations

import json
import time

import click
import psutil

from flows.commands import command, expected_errors_without_traceback
from flows.ephemeral import begin_temporary_server, own_temporary_server
from tasks import tracking


def _sweep(config: str, ray_address: str | None, max_concurrent: int | None, max_trials: int | None,
           resume: bool, as_json: bool) -> int:
    # the sweep and training flows load MLflow: when the command runs (see flows/commands/__init__.py)
    from flows.sweep import load_sweep, sweep_flow, trial_configs
    from flows.train import precheck

    sweep = load_sweep(config, {"ray_address": ray_address, "max_concurrent": max_concurrent,
                                "max_trials": max_trials, "resume": resume or None})  # checked before Ray or Prefect
    begin_temporary_server()  # boots while the trials' models and data are checked
    tracking.check_remote()
    checked: set[str] = set()
    for _, cfg in trial_configs(sweep):  # model, data, labels: found before Prefect and Ray start
        key = cfg.model_dump_json(include={"data": True, "train": {"model"}})
        if key not in checked:
            checked.add(key)
            precheck(cfg)
    own_temporary_server()  # no PREFECT_API_URL: the temporary server dies with this command (kill -9 included)
    with expected_errors_without_traceback():
        result = sweep_flow(sweep)
    result["command_seconds"] = round(_process_seconds(), 1)  # what the person waited, imports included
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(sweep_text(result))
    return 0


def _process_seconds() -> float:
    return time.time() - psutil.Process().create_time()


def sweep_text(r: dict) -> str:
    """The sweep's table and outcome, for the terminal."""
    key = r["metric"]
    names = [k for k in r["trials"][0] if k not in ("trial", "run_id", "status", "seconds", "error", "epochs_trained",
                                                    "pruned_at_epoch")
             and not k.startswith(("eval_", "train_", "perplexity"))] if r["trials"] else []
    whole = f"{r['command_seconds']:.0f} s for the command, " if r.get("command_seconds") else ""
    pruned = f"{r['pruned']} pruned, " if r.get("pruned") else ""
    lines = [f"== sweep finished: {len(r['trials'])} trials, {pruned}{r['failed']} failed, {whole}{r['wall_seconds']:.0f} s "
             f"for the sweep flow, {r.get('trials_seconds', 0):.0f} s of it the trials ==",
             "  " + "  ".join(f"{h:>14}" for h in ["trial", *names, key, "seconds", "epochs", "status"])]
    for t in r["trials"]:
        score = t.get(key)
        cells = [t["trial"], *(t.get(n) for n in names), f"{score:.4f}" if isinstance(score, float) else "-",
                 f"{t['seconds']:.0f}", t.get("epochs_trained", "-"),
                 t["status"] + (" *" if t["trial"] == r["best_trial"] else "")]
        lines.append("  " + "  ".join(f"{c:>14}" if not isinstance(c, float) else f"{c:>14.4g}" for c in cells))
    lines.append(f"  MLflow parent run      {r['parent_run_id']}")
    if r.get("study"):
        lines.append(f"  Optuna study           {r['study']} ({r.get('study_finished_trials', 0)} finished trials)")
    if r.get("version"):
        lines.append(f"  best trial {r['best_trial']} registered as version {r['version']}: {r['decision']}")
    return "\n".join(lines)


def commands() -> list[click.Command]:
    return [command(
        "sweep", "Hyper-parameter sweep on Ray: trials as Prefect tasks, nested MLflow runs, the best one registered.",
        "finetune sweep --config deployments/sweep.yaml",
        [
            click.Option(["--config"], required=True, metavar="SWEEP.yaml",
                         help="The sweep: job, base config, method (grid/random/tpe), parameters, pruner, metric, max_trials "
                              "(see flows/sweep.py and deployments/sweep.yaml)."),
            click.Option(["--ray-address"], metavar="ADDRESS",
                         help="A running Ray cluster (e.g. ray://head:10001); default: a local Ray for this sweep."),
            click.Option(["--max-concurrent"], type=int, metavar="N", help="Trials at the same time (overrides the file)."),
            click.Option(["--max-trials"], type=int, metavar="N", help="Trial budget (overrides the file)."),
            click.Option(["--resume"], is_flag=True, default=False,
                         help="Add trials to the last study of this search (its finished trials are not trained "
                              "again); as `resume: true` in the file."),
            click.Option(["--json", "as_json"], is_flag=True, default=False, help="Print the result as JSON."),
        ],
        _sweep,
    )]
