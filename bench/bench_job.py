"""Benchmark: the whole `finetune classify` job (CLI start, Prefect, data, tokenize, train, evaluate, MLflow logging,
registration, promotion) against the plain HF Trainer script a user would write instead (bench/trainer_classify.py:
same examples, model, length, batch, schedule and epochs, bf16 where the CPU has it natively), one after the other
in one run. Prints both wall times, both held-out accuracies, the precision each used and the ratio.

    .venv/bin/python bench/bench_job.py                       # the default job
    .venv/bin/python bench/bench_job.py -- --train-samples 2000 --eval-samples 500   # flags go to both sides

Each side starts cold: a fresh cache dir and MLflow store for the job (its Prefect temporary server starts as it
does for a user), a fresh process for the Trainer script. Wall times on a shared machine are noisy: compare the
ratio, and rerun with --repeats 2 for medians.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402


def run_job(flags: list[str], tmp: Path) -> dict:
    seconds, run = common.run_job("classify", flags, tmp, "bench-classifier")
    return {"seconds": seconds, "accuracy": run.data.metrics["eval_accuracy"], "f1": run.data.metrics["eval_f1"],
            "precision": run.data.params.get("device", "?")}


def run_trainer(cfg, tmp: Path, same_recipe: bool = False) -> dict:
    from tasks.data import prepare_dataset

    os.environ["FINETUNE_CACHE_DIR"] = str(tmp / "peer-cache")
    data = prepare_dataset(cfg.data, cfg.train.seed)  # the same examples, given to the script ready to load
    seconds, result = common.run_peer("trainer_classify.py", data.path, cfg, tmp / "peer", same_recipe)
    return {**result, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--peers", default="stock", help="comma-separated Trainer scripts to run: stock (the checkpoint's "
                    "dropout, embeddings trained, default attention: what a user writes) and/or same (the job's "
                    "dropout, frozen embeddings and training attention: separates the recipe from the engineering)")
    ap.add_argument("flags", nargs="*", help="finetune classify flags (after --), applied to both sides")
    a = ap.parse_args()

    cfg = common.job_config("classify", a.flags)
    peers, chosen = common.PEERS, common.chosen_peers(ap, a.peers)
    rows: dict[str, list[dict]] = {"finetune classify (whole job)": [], **{peers[p]: [] for p in chosen}}
    for i in range(a.repeats):
        with tempfile.TemporaryDirectory(prefix="bench-job-") as d:
            rows["finetune classify (whole job)"].append(run_job(a.flags, Path(d)))
            for p in chosen:
                rows[peers[p]].append(run_trainer(cfg, Path(d) / p, same_recipe=p == "same"))
    print(f"\nclassification, whole job, {cfg.data.train_samples} train / {cfg.data.eval_samples} eval, "
          f"batch {cfg.train.batch_size}, length {cfg.data.max_length}, {cfg.train.epochs} epoch(s), "
          f"{os.cpu_count()} CPUs, {a.repeats} repeat(s)")
    print(f"{'side':<32}{'wall s (median)':>16}{'accuracy':>10}{'f1':>8}  precision   runs (s)")
    med = {}
    for side, rs in rows.items():
        med[side] = statistics.median(r["seconds"] for r in rs)
        print(f"{side:<32}{med[side]:>16.1f}{rs[-1]['accuracy']:>10.4f}{rs[-1]['f1']:>8.4f}  {rs[-1]['precision']:<11} "
              + ", ".join(f"{r['seconds']:.1f}" for r in rs))
    job = med["finetune classify (whole job)"]
    for p in chosen:
        peer = med[peers[p]]
        print(f"job time / {peers[p]} time: {job / peer:.2f}  (the job is {peer / job:.2f}x as fast)")


if __name__ == "__main__":
    main()
