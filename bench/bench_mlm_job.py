"""Benchmark: the whole `finetune mlm` job (CLI start, Prefect, data, tokenize, train, evaluate, MLflow logging,
registration, promotion) against the plain HF Trainer masked-LM script a user would write instead
(bench/trainer_mlm.py: stock head over every position, transformers' masking collator, same texts truncated to
max_length, model, batch, schedule and epochs, bf16 where the CPU has it natively), one after the other in one run.
Prints both wall times, both perplexities on the same masks, the precision each used and the ratio.

    .venv/bin/python bench/bench_mlm_job.py                       # the default job
    .venv/bin/python bench/bench_mlm_job.py -- --train-samples 2000 --eval-samples 500   # flags go to both sides
    .venv/bin/python bench/bench_mlm_job.py --peers stock,same    # also a Trainer with the job's recipe

The job always runs with --no-group-texts: both sides see each text truncated, not packed into blocks.
Perplexity is compared on the same masks: the job scores its model on its fixed-mask eval split; the Trainer's
saved model is scored here by the job's own evaluation on that same split (its own trainer.evaluate() draws masks
at random: shown apart, for reference). Each side starts cold: a fresh cache dir and MLflow store for the job (its
Prefect temporary server starts as it does for a user), a fresh process for the Trainer script. Wall times on a
shared machine are noisy: compare the ratio, and rerun with --repeats 2 for medians.
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

JOB = "finetune mlm (whole job)"
TRUNCATE = ["--no-group-texts"]  # last, so it wins over a --group-texts given after --


def run_job(flags: list[str], tmp: Path) -> dict:
    seconds, run = common.run_job("mlm", [*flags, *TRUNCATE], tmp, "bench-fill-mask")
    m = run.data.metrics
    return {"seconds": seconds, "perplexity": m["perplexity"], "eval_loss": m["eval_loss"],
            "accuracy": m["eval_masked_accuracy"], "precision": run.data.params.get("device", "?"),
            "masked_tokens": run.data.params.get("data.eval_masked_tokens")}


def run_trainer(cfg, tmp: Path, same_recipe: bool = False) -> dict:
    import datasets

    from tasks.data import prepare_dataset
    from tasks.jobs.mlm import training_mask_probability

    datasets.disable_progress_bars()  # this process's data steps only: the table stays readable
    os.environ["FINETUNE_CACHE_DIR"] = str(tmp / "peer-cache")
    data = prepare_dataset(cfg.data, cfg.train.seed)  # the same texts, given to the script ready to load
    # A stock script masks its training batches at the usual rate; the same-recipe peer at the job's training rate.
    train_p = training_mask_probability(cfg) if same_recipe else cfg.mlm_probability
    seconds, own = common.run_peer("trainer_mlm.py", data.path, cfg, tmp / "peer", same_recipe,
                                   ["--mlm-probability", str(train_p)])
    fixed = score_on_fixed_masks(cfg, data.path, str(tmp / "peer" / "model"))  # after the clock: not its work
    return {"seconds": seconds, "perplexity": fixed["perplexity"], "eval_loss": fixed["eval_loss"],
            "accuracy": fixed["eval_masked_accuracy"], "precision": own["precision"],
            "own_perplexity": own["perplexity"], "masked_tokens": fixed["masked_tokens"]}


def score_on_fixed_masks(cfg, data_path: str, model_dir: str) -> dict:
    """The Trainer's model scored as the job scores its own: the same texts tokenized and truncated by the job's
    tokenize_for_mlm (same arguments, so the same seeded eval masks), the job's eval loader and collator, the
    recipe's evaluation (masked positions only, token-weighted) under the job's precision. Random masks would move
    the peer's perplexity with the dice; these make the two numbers comparable."""
    from tasks.device import amp_dtype, select_device
    from tasks.mlm_data import mlm_stats, tokenize_for_mlm
    from tasks.training import build_loaders

    spec, t = cfg.spec(), cfg.train
    tokenized = tokenize_for_mlm(data_path, t.model, cfg.data.max_length, False, cfg.mlm_probability, t.seed)
    device = select_device(t.device)
    model = spec.recipe.load_model(model_dir, spec).to(device)
    r = spec.recipe.evaluate(model, build_loaders(tokenized, spec)["eval"], device, amp_dtype(device, t.precision),
                             desc="peer on fixed masks")
    return {**r, "masked_tokens": mlm_stats(tokenized)["eval_masked_tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--peers", default="stock", help=common.PEERS_HELP)
    ap.add_argument("flags", nargs="*", help="finetune mlm flags (after --), applied to both sides")
    a = ap.parse_args()

    cfg = common.job_config("mlm", [*a.flags, *TRUNCATE])
    peers, chosen = common.PEERS, common.chosen_peers(ap, a.peers)
    rows: dict[str, list[dict]] = {JOB: [], **{peers[p]: [] for p in chosen}}
    for i in range(a.repeats):
        with tempfile.TemporaryDirectory(prefix="bench-mlm-job-") as d:
            rows[JOB].append(run_job(a.flags, Path(d)))
            for p in chosen:
                rows[peers[p]].append(run_trainer(cfg, Path(d) / p, same_recipe=p == "same"))
    print(f"\nmasked LM, whole job, {cfg.data.train_samples} train / {cfg.data.eval_samples} eval texts truncated to "
          f"{cfg.data.max_length} tokens (not packed), batch {cfg.train.batch_size}, {cfg.train.epochs} epoch(s), "
          f"masking {cfg.mlm_probability}, {os.cpu_count()} CPUs, {a.repeats} repeat(s)")
    print(f"{'side':<28}{'wall s (median)':>16}{'perplexity':>12}{'masked acc':>12}{'own ppl':>10}  precision      "
          "runs (s)")
    med = {}
    for side, rs in rows.items():
        med[side] = statistics.median(r["seconds"] for r in rs)
        own = f"{rs[-1]['own_perplexity']:.2f}" if "own_perplexity" in rs[-1] else "-"
        print(f"{side:<28}{med[side]:>16.1f}{rs[-1]['perplexity']:>12.2f}{rs[-1]['accuracy']:>12.4f}{own:>10}  "
              f"{rs[-1]['precision']:<14} " + ", ".join(f"{r['seconds']:.1f}" for r in rs))
    print("perplexity and masked acc: every side on the job's fixed-mask eval split; own ppl: the Trainer's own "
          "evaluate() (random masks)")
    counts = {str(r.get("masked_tokens")) for rs in rows.values() for r in rs}
    if len(counts) != 1:  # the same split masked the same way has the same count: anything else is not comparable
        print(f"WARNING: the sides' eval splits differ in masked tokens ({', '.join(sorted(counts))}): the "
              "perplexities are not on the same masks")
    job = med[JOB]
    for p in chosen:
        peer = med[peers[p]]
        print(f"job time / {peers[p]} time: {job / peer:.2f}  (the job is {peer / job:.2f}x as fast); perplexity "
              f"{rows[JOB][-1]['perplexity']:.2f} vs {rows[peers[p]][-1]['perplexity']:.2f}")


if __name__ == "__main__":
    main()
