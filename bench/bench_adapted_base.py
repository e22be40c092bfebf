"""Benchmark: does domain adaptation pay on the bundled reviews? The default `finetune classify` from the pretrained
MiniLM against the same job from the default `finetune mlm` version (the adapted encoder, `--model
models:/<mlm>/<version>`), over several seeds, side by side in one run. Prints accuracy and macro-F1 mean and
spread (sample standard deviation, and min..max) per base, and the wall time of each stage (the mlm run once; each
classify run), so the adapted recipe's full cost is mlm + classify.

    .venv/bin/python bench/bench_adapted_base.py                     # the defaults, seeds 0,1,2 (about 30 min on 2 cores)
    .venv/bin/python bench/bench_adapted_base.py --seeds 0 \\
        --mlm-flags "--train-samples 40 --eval-samples 20 --max-length 32" \\
        --classify-flags "--train-samples 40 --eval-samples 20 --max-length 32"   # a dry run of the script

The seed is the job's `--seed`: it draws the training subset and the held-out split as well as the initialisation,
so each seed is a paired comparison (both bases see the same examples). One fresh MLflow store and cache for the
whole benchmark; each side registers under its own name (promotion between them plays no part). Wall times on a
shared machine are noisy: compare them within one run.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402

MLM_NAME, PRETRAINED_NAME, ADAPTED_NAME = "bench-fill-mask", "bench-cls-pretrained", "bench-cls-adapted"


def spread(xs: list[float]) -> str:
    """`mean ± sd (min..max)`; one value: the value alone."""
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f} ({min(xs):.4f}..{max(xs):.4f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated classify seeds (each run on both bases)")
    ap.add_argument("--mlm-flags", default="", help="extra `finetune mlm` flags (one string)")
    ap.add_argument("--classify-flags", default="", help="extra `finetune classify` flags, for both bases")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    mlm_flags, cls_flags = shlex.split(a.mlm_flags), shlex.split(a.classify_flags)

    rows: dict[str, list[dict]] = {"pretrained MiniLM": [], "adapted (mlm version)": []}
    with tempfile.TemporaryDirectory(prefix="bench-adapted-") as d:
        tmp = Path(d)
        # --- stage 1: the mlm job, once (its registered version is the adapted base)
        mlm_seconds, mlm_run = common.run_job("mlm", mlm_flags, tmp, MLM_NAME)
        version = mlm_run.data.tags.get("registered_version")
        decision = mlm_run.data.tags.get("promotion.decision", "")
        from mlflow import MlflowClient

        history = MlflowClient(f"sqlite:///{tmp}/mlflow.db").get_metric_history(mlm_run.info.run_id, "perplexity")
        ppl = {h.step: h.value for h in history}  # epoch 0: the model before fine-tuning (the mlm job's floor)
        base_uri = f"models:/{MLM_NAME}/{version}"
        # --- stage 2: classify from each base, seed by seed (paired)
        for seed in seeds:
            for label, name, model in (("pretrained MiniLM", PRETRAINED_NAME, "bundled-minilm"),
                                       ("adapted (mlm version)", ADAPTED_NAME, base_uri)):
                seconds, run = common.run_job("classify", [*cls_flags, "--seed", str(seed), "--model", model],
                                              tmp, name)
                rows[label].append({"seed": seed, "seconds": seconds, "accuracy": run.data.metrics["eval_accuracy"],
                                    "f1": run.data.metrics["eval_f1"]})
                print(f"  seed {seed} {label:<22} accuracy {rows[label][-1]['accuracy']:.4f}  "
                      f"{seconds:.0f} s", flush=True)

    print(f"\nadapted base vs pretrained, classify flags {cls_flags or 'default'}, seeds {seeds}")
    print(f"  mlm stage: {mlm_seconds:.0f} s, version {version}, perplexity {ppl.get(max(ppl), float('nan')):.2f} "
          f"(epoch 0: {ppl.get(0, float('nan')):.2f}); {decision}")
    print(f"  {'base':<24} {'accuracy mean ± sd (min..max)':<38} {'macro-F1 mean ± sd (min..max)':<38} classify s/run")
    for label, rs in rows.items():
        print(f"  {label:<24} {spread([r['accuracy'] for r in rs]):<38} {spread([r['f1'] for r in rs]):<38} "
              f"{statistics.mean(r['seconds'] for r in rs):.0f}")
    diffs = [b["accuracy"] - a_["accuracy"] for a_, b in zip(rows["pretrained MiniLM"], rows["adapted (mlm version)"])]
    print(f"  paired accuracy difference (adapted - pretrained) per seed: {', '.join(f'{x:+.4f}' for x in diffs)}"
          + (f"; mean {statistics.mean(diffs):+.4f}" if len(diffs) > 1 else ""))
    print("  adapted recipe cost: mlm stage once + a classify run; the machine is shared: compare times in this run")


if __name__ == "__main__":
    main()
