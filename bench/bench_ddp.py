"""Benchmark: the training step in one process against 2 data-parallel processes under torchrun (gloo on the CPU),
same model, data, global batch and seed, in one run. Prints samples/s (the loop's own figure, summed over ranks)
and the wall time of the whole step (launch, model load, training, evaluation, save).

    .venv/bin/python bench/bench_ddp.py [--train-samples 512] [--global-batch 16] [--max-length 128]

On a 2-core machine two processes share the same 2 cores, so this shows the overhead of DDP (process start,
all-reduce over gloo, two model copies), not a speed-up; on a node with one GPU per process the same command
scales with the number of GPUs.
"""
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
    ap.add_argument("--train-samples", type=int, default=512)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    os.environ["FINETUNE_CACHE_DIR"] = str(tmp / "cache")

    from flows.config import ClassifyConfig
    from tasks.data import prepare_dataset
    from tasks.training import train

    rows = []
    for procs in (1, 2):
        cfg = ClassifyConfig.model_validate({
            "data": {"train_samples": a.train_samples, "eval_samples": 128, "max_length": a.max_length},
            "train": {"epochs": 1, "batch_size": a.global_batch // procs, "nproc_per_node": procs,
                      "output_dir": str(tmp / f"out{procs}")},
        })
        data = prepare_dataset(cfg.data, cfg.train.seed)
        spec = cfg.spec(data.label_names)
        tokenized = cfg.recipe.tokenize(data.path, cfg.train.model, spec)
        t0 = time.perf_counter()
        r = train(spec, tokenized, str(tmp / f"run{procs}"))
        rows.append((procs, r.train_samples_per_second, time.perf_counter() - t0, r.final.get("eval_accuracy"), r.device))
    print(f"\ntraining step, classify, {a.train_samples} samples, global batch {a.global_batch}, length "
          f"{a.max_length}, {os.cpu_count()} CPUs")
    print(f"{'processes':<11}{'samples/s':>10}{'wall s':>9}{'eval_acc':>10}  device")
    for procs, sps, wall, acc, dev in rows:
        print(f"{procs:<11}{sps:>10.2f}{wall:>9.1f}{acc:>10.4f}  {dev}")
    print(f"2 processes / 1 process, samples/s: {rows[1][1] / rows[0][1]:.2f}; wall: {rows[1][2] / rows[0][2]:.2f}")


if __name__ == "__main__":
    main()
