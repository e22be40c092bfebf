"""Benchmarks of sweeps, each in one run (MLflow and the Optuna study in a temporary store):

    .venv/bin/python bench/bench_sweep.py [--trials 4] [--train-samples 300]
    .venv/bin/python bench/bench_sweep.py --search [--train-samples 128] [--epochs 3] [--tpe-trials 8] [--pruner median]

Default: a sweep's trials in parallel on Ray against the same trials one after another. Parallel: `max_concurrent`
2, one CPU each (Ray gives each trial one thread). Sequential: one trial at a time with every CPU. Same trials,
data, model (the bundled MiniLM) and seed. On 2 cores, parallel trials can only win what one trial leaves unused
(data loading, evaluation, logging, start-up).

--search: one 12-point search space (6 learning rates x 2 warmup ratios) on the bundled reviews, searched by grid
(all 12, every trial to the end) and by TPE with a pruner (`--tpe-trials` trials, `--pruner`); prints the best
eval_f1, the trial-epochs spent (epochs actually trained, summed over trials) and the wall time side by side.
Goal (issue 23): TPE + pruning within 0.005 of the grid's best for at most half the grid's trial-epochs."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


SPACE = {"train.learning_rate": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3], "train.warmup_ratio": [0.0, 0.2]}


def search(a, tmp: Path) -> None:
    """Grid without pruning against TPE with a pruner, over SPACE."""
    from flows.sweep import SweepConfig, sweep_flow

    def run(**over) -> tuple[float, dict]:
        cfg = SweepConfig.model_validate({
            "job": "classify", "promote": False, "max_concurrent": 2, "resources": {"cpus": 1}, "seed": 0,
            "base": {"data": {"train_samples": a.train_samples, "eval_samples": a.eval_samples, "max_length": 128},
                     "train": {"epochs": a.epochs, "output_dir": str(tmp / "out")},
                     "tracking": {"experiment": "bench-sweep", "registered_model": "bench-sweep"}},
            "parameters": SPACE, "metric": "f1", **over})
        t0 = time.perf_counter()
        out = sweep_flow(cfg)
        return time.perf_counter() - t0, out

    grid_s, grid = run(method="grid", max_trials=12)
    tpe_s, tpe = run(method="tpe", pruner=a.pruner, max_trials=a.tpe_trials, startup_trials=a.startup_trials)
    print(f"\nsearch over {len(SPACE['train.learning_rate']) * len(SPACE['train.warmup_ratio'])} points "
          f"(lr x warmup), classify on the bundled reviews ({a.train_samples} train / {a.eval_samples} eval, "
          f"length 128, {a.epochs} epochs), 2 trials at a time x 1 CPU, {os.cpu_count()} CPUs")
    print(f"{'search':<34}{'trials':>7}{'pruned':>8}{'best eval_f1':>14}{'trial-epochs':>14}{'wall s':>9}")
    rows = []
    for name, s, o in (("grid, no pruning", grid_s, grid), (f"tpe + {a.pruner} pruner", tpe_s, tpe)):
        best = max((t["eval_f1"] for t in o["trials"] if t["status"] == "FINISHED"), default=float("nan"))
        rows.append((best, o["epochs_trained"], s))
        print(f"{name:<34}{len(o['trials']):>7}{o['pruned']:>8}{best:>14.4f}{o['epochs_trained']:>14}{s:>9.0f}")
    for label, o in (("grid", grid), ("tpe", tpe)):
        print(f"{label}: " + ", ".join(f"{t['trial']}:lr={t['train.learning_rate']:g},wu={t['train.warmup_ratio']:g}"
                                       f"->{t.get('eval_f1', float('nan')):.4f}/{t['status'][0]}{t.get('epochs_trained', 0)}"
                                       for t in o["trials"]))
    (gb, ge, gs), (tb, te, ts) = rows
    ok = tb >= gb - 0.005 and te <= ge / 2
    print(f"goal (best within 0.005 of grid's, at most half its trial-epochs): {'met' if ok else 'NOT met'} "
          f"(best {tb - gb:+.4f}, trial-epochs {te}/{ge} = {te / ge:.2f}, wall time {ts / gs:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--train-samples", type=int, default=None, help="default: 300 (parallel), 128 (--search)")
    ap.add_argument("--search", action="store_true", help="grid without pruning vs TPE with a pruner")
    ap.add_argument("--eval-samples", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--tpe-trials", type=int, default=8)
    ap.add_argument("--startup-trials", type=int, default=2)
    ap.add_argument("--pruner", default="median", choices=["median", "asha", "hyperband"])
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    os.environ["FINETUNE_CACHE_DIR"] = str(tmp / "cache")
    # Prefect's temporary server with its own database (not one shared with other runs on this machine), and time
    # to start on a loaded machine
    os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if a.search:
        a.train_samples = a.train_samples or 128
        return search(a, tmp)
    a.train_samples = a.train_samples or 300

    from flows.sweep import SweepConfig, sweep_flow

    cpus = os.cpu_count() or 1
    lrs = [5e-5 * (i + 1) for i in range(a.trials)]

    def sweep(concurrent: int, per_trial_cpus: float) -> tuple[float, dict]:
        cfg = SweepConfig.model_validate({
            "job": "classify", "promote": False, "max_trials": a.trials, "max_concurrent": concurrent,
            "resources": {"cpus": per_trial_cpus},
            "base": {"data": {"train_samples": a.train_samples, "eval_samples": 100, "max_length": 64},
                     "train": {"output_dir": str(tmp / "out")},
                     "tracking": {"experiment": "bench-sweep", "registered_model": "bench-sweep"}},
            "parameters": {"train.learning_rate": lrs},
        })
        t0 = time.perf_counter()
        out = sweep_flow(cfg)
        return time.perf_counter() - t0, out

    seq_s, seq = sweep(1, cpus)
    par_s, par = sweep(2, 1)
    print(f"\nsweep of {a.trials} classify trials ({a.train_samples} train / 100 eval, length 64), {cpus} CPUs")
    print(f"{'mode':<38}{'flow s':>8}{'trials s':>10}  best eval_f1")
    for name, s, o in ((f"one after another (1 x {cpus} CPUs)", seq_s, seq), ("parallel on Ray (2 x 1 CPU)", par_s, par)):
        best = max((t.get("eval_f1", 0) for t in o["trials"]), default=float("nan"))
        print(f"{name:<38}{s:>8.1f}{o['wall_seconds']:>10.1f}  {best:.4f}")
    print(f"parallel / sequential wall time: {par_s / seq_s:.2f}")


if __name__ == "__main__":
    main()
