"""Benchmark: this project's `manual` classification loop against the plain HF Trainer on the same model, data,
batch size and number of optimizer steps, in one run. Prints samples/s side by side and their ratio.

    .venv/bin/python bench/bench_classify.py [--steps 30] [--batch-size 16] [--max-length 128] [--repeats 2]

Runs alternate (manual, trainer, manual, trainer...) so drift on a noisy machine hits both; the median is shown.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="bundled-minilm")
    args = ap.parse_args()

    import torch
    from datasets import load_from_disk
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from flows.config import ClassifyConfig
    from tasks.base_model import resolve_model
    from tasks.common import seed_everything
    from tasks.data import prepare_dataset
    from tasks.loaders import build_dataloaders
    from tasks.tokenize import tokenize_dataset
    from tasks.jobs.classify import load_model
    from tasks.training import fit_manual
    from transformers import AutoTokenizer

    n = args.steps * args.batch_size
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    cfg = ClassifyConfig.model_validate({
        "data": {"train_samples": n, "eval_samples": 16, "max_length": args.max_length},
        "train": {"model": args.model, "epochs": 1, "batch_size": args.batch_size, "output_dir": str(tmp)},
    })
    data = prepare_dataset(cfg.data, cfg.train.seed)
    tok_path = tokenize_dataset(data.path, cfg.train.model, args.max_length)
    spec = cfg.spec(data.label_names)
    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.train.model))
    device = torch.device("cpu")

    def manual() -> float:
        seed_everything(0)
        model = load_model(resolve_model(cfg.train.model), spec)
        loaders = build_dataloaders(tok_path, cfg.train.model, args.batch_size, 64, 0)
        t0 = time.perf_counter()
        fit_manual(spec, model, loaders, tmp / f"m{time.time()}", lambda m, d: {}, None, device, None)
        return n / (time.perf_counter() - t0)

    def trainer() -> float:
        seed_everything(0)
        model = load_model(resolve_model(cfg.train.model), spec)
        dd = load_from_disk(tok_path)
        targs = TrainingArguments(
            output_dir=str(tmp / "hf"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=cfg.train.learning_rate, save_strategy="no", eval_strategy="no", report_to=[],
            use_cpu=True, logging_strategy="no", disable_tqdm=True, seed=0,
        )
        t = Trainer(model=model, args=targs, train_dataset=dd["train"], data_collator=DataCollatorWithPadding(tok))
        t0 = time.perf_counter()
        t.train()
        return n / (time.perf_counter() - t0)

    res: dict[str, list[float]] = {"manual (this project)": [], "HF Trainer": []}
    for _ in range(args.repeats):
        res["manual (this project)"].append(manual())
        res["HF Trainer"].append(trainer())
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"\nclassification, {args.model}, batch {args.batch_size}, max_length {args.max_length}, "
          f"{args.steps} steps x {args.repeats} repeats, {torch.get_num_threads()} threads")
    print(f"{'engine':<24}{'samples/s (median)':>20}{'runs':>30}")
    for k, v in res.items():
        print(f"{k:<24}{med[k]:>20.2f}{', '.join(f'{x:.2f}' for x in v):>30}")
    print(f"ratio manual / Trainer: {med['manual (this project)'] / med['HF Trainer']:.3f}")


if __name__ == "__main__":
    main()
