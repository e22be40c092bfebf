"""Benchmark: the training step's cost levers one at a time, in one run, on the same model, batch and precision:
the stock step a plain script runs (the checkpoint's dropout, every weight trained, the model's default attention,
for-each AdamW), then each of the project's choices added in turn (TrainConfig: dropout, freeze_embeddings,
attention, and fused AdamW), each against the stock step of the same run.

    .venv/bin/python bench/bench_step.py                       # MiniLM, batch 16 x 128 tokens, precision auto
    .venv/bin/python bench/bench_step.py --max-length 256 --precision fp32

Full-length rows of random token ids (no padding: length grouping is measured by bench_job.py on real data).
Variants alternate over --repeats rounds so load from other processes hits them alike; medians are printed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name -> (dropout, freeze_embeddings, attention, fused): each row adds one choice to the row above
VARIANTS = {
    "stock (a plain script)": (None, False, "sdpa", False),
    "+ fused AdamW": (None, False, "sdpa", True),
    "+ frozen token embeddings": (None, True, "sdpa", True),
    "+ dropout 0": (0.0, True, "sdpa", True),
    "+ attention auto (the project)": (0.0, True, "auto", True),
}


def step_seconds(variant, model_path: str, batch: int, length: int, precision: str, steps: int, warmup: int) -> float:
    import torch
    from transformers import AutoModelForSequenceClassification

    from tasks.device import amp_dtype, autocast, select_device
    from tasks.training import TrainConfig, attention_implementation, prepare_for_training, training_attention

    dropout, freeze, attention, fused = variant
    device = select_device("auto")
    dtype = amp_dtype(device, precision)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2).to(device)
    t = TrainConfig(dropout=dropout, freeze_embeddings=freeze, attention="auto" if attention == "auto" else attention)
    prepare_for_training(model, t)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused, foreach=None if fused else True)
    ids = torch.randint(1000, 30000, (batch, length), device=device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (batch,), device=device)
    model.train()
    times = []
    with attention_implementation(model, training_attention(t, device, dtype)):
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            with autocast(device, dtype):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bundled-minilm")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()

    from transformers.utils import logging as hf_logging

    from tasks.base_model import resolve_model
    from tasks.device import amp_dtype, describe, select_device

    hf_logging.set_verbosity_error()
    path = resolve_model(a.model)
    device = select_device("auto")
    runs: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for _ in range(a.repeats):
        for name, v in VARIANTS.items():
            runs[name].append(step_seconds(v, path, a.batch_size, a.max_length, a.precision, a.steps, a.warmup))
    print(f"\ntraining step, {a.model}, batch {a.batch_size} x {a.max_length} tokens, "
          f"{describe(device, amp_dtype(device, a.precision))}, median of {a.steps} steps x {a.repeats} rounds")
    print(f"{'variant':<34}{'ms/step':>9}{'samples/s':>11}{'vs stock':>10}")
    stock = statistics.median(runs["stock (a plain script)"])
    for name, r in runs.items():
        s = statistics.median(r)
        print(f"{name:<34}{s * 1000:>9.0f}{a.batch_size / s:>11.1f}{stock / s:>9.2f}x")


if __name__ == "__main__":
    main()
