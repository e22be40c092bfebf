"""Benchmark: the data steps of a job on a cold cache (miss) against a warm one (hit), in one run, for the default
classify data (3,000 + 1,000 IMDB reviews, length 128) or the flags given. Both the plain functions and the
Prefect tasks the flow calls (Prefect's cache in front of the content-addressed directories) are timed.

    .venv/bin/python bench/bench_cache.py [-- --train-samples 2000 ...]
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed(fn, *a, **k):
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t0


def main() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_job import config_from_flags

    flags = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    cfg = config_from_flags(flags)
    os.environ["FINETUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-cache-")

    from prefect import flow

    from tasks.common import cached_path_result
    from tasks.data import prepare_dataset
    from tasks.prefect_tasks import load_dataset_task, tokenize_job_task
    from tasks.tokenize import tokenize_job

    rows = []
    # plain functions: the content-addressed directories alone
    data, prep_miss = timed(prepare_dataset, cfg.data, cfg.train.seed)
    spec = cfg.spec(data.label_names)
    tok, tok_miss = timed(tokenize_job, data.path, cfg.train.model, spec)
    hits = [timed(prepare_dataset, cfg.data, cfg.train.seed)[1] for _ in range(3)]
    tok_hits = [timed(tokenize_job, data.path, cfg.train.model, spec)[1] for _ in range(3)]
    rows += [("prepare (plain function)", prep_miss, statistics.median(hits)),
             ("tokenize (plain function)", tok_miss, statistics.median(tok_hits))]

    # the Prefect tasks, as the flow calls them, on a fresh cache dir: first call misses, the next ones hit
    os.environ["FINETUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-cache-")

    @flow(name="bench-cache")
    def steps() -> list[float]:
        d, t_load = timed(cached_path_result, load_dataset_task, cfg.data, cfg.train.seed, None, path_of=lambda r: r.path)
        _, t_tok = timed(cached_path_result, tokenize_job_task, d.path, cfg.train.model, cfg.spec(d.label_names))
        return [t_load, t_tok]

    miss = steps()
    hit = [steps() for _ in range(3)]
    rows += [("load-dataset (Prefect task)", miss[0], statistics.median(h[0] for h in hit)),
             ("tokenize (Prefect task)", miss[1], statistics.median(h[1] for h in hit))]

    print(f"\ndata steps, {data.num_train} train / {data.num_eval} eval, max_length {cfg.data.max_length}")
    print(f"{'step':<30}{'miss s':>10}{'hit s':>10}{'miss / hit':>12}")
    for name, m, h in rows:
        print(f"{name:<30}{m:>10.3f}{h:>10.4f}{m / h:>11.0f}x")


if __name__ == "__main__":
    main()
