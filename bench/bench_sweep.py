"""Benchmark: a sweep's trials in parallel on Ray against the same trials one after another, in one run.

    .venv/bin/python bench/bench_sweep.py [--trials 4] [--train-samples 300]

Parallel: `max_concurrent` 2, one CPU each (Ray gives each trial one thread). Sequential: one trial at a time with
every CPU. Same trials, data, model (the bundled MiniLM) and seed; MLflow in a temporary store. On 2 cores,
parallel trials can only win what one trial leaves unused (data loading, evaluation, logging, start-up)."""
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--train-samples", type=int, default=300)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    os.environ["FINETUNE_CACHE_DIR"] = str(tmp / "cache")

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
