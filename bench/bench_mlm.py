"""MLM training speed, in one run, on the same data, collator, weights and hyperparameters:

  project   this project's path: TRL SFTTrainer subclass whose loss runs the prediction head on the masked
            positions only (tasks/jobs/mlm.py)
  hf-stock  plain transformers Trainer with the stock BertForMaskedLM forward: the head over every position
  trl-stock (--with-trl-stock) TRL's stock SFTTrainer loss, for reference only: it trains the wrong, shifted
            objective, so its speed is not a fair alternative

Runs alternate (project, hf-stock, project, hf-stock, ...) so that load from other processes hits both alike;
the first optimizer steps of each run are warm-up and not timed. The first-step losses of `project` and
`hf-stock` must agree (same weights, same first batch, same masks): the speed-up changes no numbers.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_mlm.py               # MiniLM, 16 x 128 tokens, fp32
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_mlm.py --precision bf16 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled-minilm")
    ap.add_argument("--train-samples", type=int, default=200, help="IMDB reviews to tokenize and group")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, choices=range(1, 100), metavar="N>=1", help="untimed optimizer steps per run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per contender (alternating)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--with-trl-stock", action="store_true", help="also time TRL's stock (causal) SFTTrainer loss")
    ap.add_argument("--json", help="also write the results to this JSON file")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForMaskedLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    from flows.config import MLMConfig
    from tasks.base_model import resolve_model
    from tasks.common import seed_everything
    from tasks.data import prepare_dataset
    from tasks.device import amp_dtype, describe, select_device
    from tasks.mlm_data import MLMBatchCollator, tokenize_for_mlm
    from tasks.jobs.mlm import build_sft_config, sft_trainer_class
    from tasks.training import hf_training_kwargs

    hf_logging.set_verbosity_error()
    steps = args.warmup + args.steps
    cfg = MLMConfig(
        data={"train_samples": args.train_samples, "eval_samples": 20, "max_length": args.max_length},
        train={"model": args.model, "batch_size": args.batch_size, "precision": args.precision, "device": args.device,
               "warmup_ratio": 0.0},
    )
    device = select_device(cfg.train.device)
    dtype = amp_dtype(device, cfg.train.precision)
    data = prepare_dataset(cfg.data, cfg.train.seed)
    tokenized = tokenize_for_mlm(data.path, cfg.train.model, args.max_length, True, cfg.mlm_probability, cfg.train.seed)
    train = load_from_disk(tokenized)["train"]
    need = steps * args.batch_size
    if len(train) < need:
        sys.exit(f"only {len(train)} blocks for {need} needed: raise --train-samples")
    train = train.select(range(need))
    path = resolve_model(cfg.train.model)
    tok = AutoTokenizer.from_pretrained(path)
    masked_share = _masked_share(MLMBatchCollator(tok, cfg.mlm_probability, cfg.train.seed), train, args.batch_size)

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.losses: list[float] = []

        def on_step_end(self, a, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    def run(kind: str, out: str) -> dict:
        seed_everything(cfg.train.seed)
        model = AutoModelForMaskedLM.from_pretrained(path)  # same seed: same (new) head weights every run
        clock = Clock()
        common = dict(max_steps=steps, eval_strategy="no", save_strategy="no", logging_strategy="steps", logging_steps=1,
                      disable_tqdm=True)
        collator = MLMBatchCollator(tok, cfg.mlm_probability, cfg.train.seed)
        if kind == "hf-stock":
            targs = TrainingArguments(
                output_dir=out, per_device_train_batch_size=args.batch_size, learning_rate=cfg.train.learning_rate,
                weight_decay=cfg.train.weight_decay, lr_scheduler_type=cfg.train.lr_scheduler, seed=cfg.train.seed,
                data_seed=cfg.train.seed, max_grad_norm=cfg.train.max_grad_norm, remove_unused_columns=False,
                bf16=dtype == torch.bfloat16, use_cpu=device.type == "cpu", report_to="none",
                dataloader_num_workers=0, **common,
            )
            trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=collator,
                              processing_class=tok, callbacks=[clock])
        else:
            sargs = build_sft_config(cfg.spec(), out, hf_training_kwargs(cfg.train, steps, device, dtype), **common)
            if kind == "project":
                cls = sft_trainer_class()
            else:
                from trl import SFTTrainer as cls  # stock: fused, next-token loss
            trainer = cls(model=model, args=sargs, train_dataset=train, data_collator=collator, processing_class=tok,
                          callbacks=[clock])
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # our own lines only
        trainer.train()
        timed = clock.ends[args.warmup - 1 :]  # from the end of the last warm-up step
        secs = timed[-1] - timed[0]
        n_steps = len(timed) - 1
        return {"kind": kind, "samples_per_s": n_steps * args.batch_size / secs, "s_per_step": secs / n_steps,
                "first_loss": clock.losses[0] if clock.losses else None}

    kinds = ["project", "hf-stock"] + (["trl-stock"] if args.with_trl_stock else [])
    results: list[dict] = []
    print(f"device {describe(device, dtype)}, torch threads {torch.get_num_threads()}, model {args.model}, "
          f"batch {args.batch_size} x {args.max_length} tokens, {args.warmup}+{args.steps} steps per run, "
          f"masked share of tokens {masked_share:.3f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for kind in kinds:
                res = run(kind, f"{tmp}/{kind}-{r}")
                results.append(res)
                print(f"  run {r + 1} {kind:<10} {res['samples_per_s']:7.2f} samples/s  {res['s_per_step']:6.2f} s/step"
                      f"  first-step loss {res['first_loss']:.4f}", flush=True)
    summary = {k: statistics.median(x["samples_per_s"] for x in results if x["kind"] == k) for k in kinds}
    first = {k: results[kinds.index(k)]["first_loss"] for k in kinds}
    print("median samples/s: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.items()))
    print(f"speed-up project / hf-stock: {summary['project'] / summary['hf-stock']:.2f}x; first-step loss "
          f"project {first['project']:.4f} vs hf-stock {first['hf-stock']:.4f} (same objective, same batch)")
    out = {"args": vars(args), "device": describe(device, dtype), "masked_share": masked_share, "runs": results,
           "median_samples_per_s": summary}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def _masked_share(collator, train, batch_size: int) -> float:
    rows = [train[i] for i in range(min(len(train), 4 * batch_size))]
    b = collator(rows)
    return float((b["labels"] != -100).sum() / b["attention_mask"].sum())


if __name__ == "__main__":
    main()
