"""GPU figures for both jobs, in one prepared run: the function a run calls for each optimizer step
(`tasks.training.loop.train_step`: the job's own model loading and head initialisation, the recipe's loss, the
run's precision and loss scaling through accelerate, training attention, fused AdamW, clipping, the scheduler), fed
by the run's own DataLoader (collated and, for MLM, masked on the fly; worker processes and pinned memory on CUDA),
with the loss read as often as the run reads it, at the job's batch size and larger ones. Prints samples/s,
tokens/s, achieved TFLOP/s and model FLOPs utilisation (MFU) side by side.

    .venv/bin/python bench/bench_gpu.py                                   # a GPU: both jobs, batch = job's, 64
    .venv/bin/python bench/bench_gpu.py --batch-sizes job,32,128 --steps 60
    .venv/bin/python bench/bench_gpu.py --device cpu --steps 4 --warmup 1 --peak-tflops 1.6   # a dry run on a CPU
    .venv/bin/python bench/bench_gpu.py -- --max-length 256              # flags after -- go to both jobs' config

FLOPs are counted, not estimated: torch's FlopCounterMode over the forward and backward pass of every timed batch
(untimed, in a separate pass; optimizer arithmetic is not model FLOPs). MFU = counted FLOPs / timed seconds / the
device's peak dense bf16 FLOP/s (known for H200, H100, A100 and L4; else --peak-tflops). The first --warmup steps
(kernel selection, allocator growth, worker start) are not timed; the clock stops after a device synchronize.
Tokens are the padded positions the model processed (dynamic padding keeps those close to the real ones)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# dense bf16 tensor-core peak, TFLOP/s, without sparsity (vendor data sheets); the first name that matches wins
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L4": 121.0}


def peak_tflops(device, given: float | None) -> float | None:
    import torch

    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def device_name(device) -> str:
    import platform

    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def measure(job: str, flags: list[str], batch_size: int | None, steps: int, warmup: int, device_flag: str | None) -> dict:
    """One job at one batch size: returns its figures (see the module docstring)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench import common
    from tasks.common import seed_everything
    from tasks.data import prepare_dataset
    from tasks.device import amp_dtype, enable_tf32, select_device
    from tasks.training import (_optimizer_and_scheduler, attention_implementation, build_loaders, loss_log_every,
                                model_for_training, training_attention)
    from tasks.training.loop import make_accelerator, step_loss, train_step

    extra = [*(["--batch-size", str(batch_size)] if batch_size else []), *(["--device", device_flag] if device_flag else [])]
    cfg = common.job_config(job, [*flags, *extra])
    t = cfg.train
    data = prepare_dataset(cfg.data, t.seed)
    spec = cfg.spec(getattr(data, "label_names", None))
    recipe = spec.recipe
    tokenized = recipe.tokenize(data.path, t.model, spec)
    device = select_device(t.device)
    dtype = amp_dtype(device, t.precision)
    enable_tf32(device)
    seed_everything(t.seed)
    model, tok = model_for_training(spec, tokenized, device)
    model.train()
    loader = build_loaders(tokenized, spec, tok)["train"]  # the run's loader: collation (and masking) on the fly
    opt, sched, total = _optimizer_and_scheduler(model, t, len(loader), device)
    acc = make_accelerator(device, dtype)
    ddp_model, opt = acc.prepare(model, opt)
    loss_fn = step_loss(spec)
    every = loss_log_every(t, total)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def batches(n: int):  # pass after pass of the loader, as epochs do (not a cached first pass)
        def passes():
            while True:
                yield from loader
        return islice(passes(), n)

    samples = tokens = 0
    with attention_implementation(model, training_attention(t, device, dtype)):
        counter = FlopCounterMode(display=False)  # untimed: forward + backward of as many batches, no update
        with counter:
            for b in batches(steps):
                b = {k: v.to(acc.device) for k, v in b.items()}
                with acc.autocast():
                    loss_fn(ddp_model, b).backward()
                opt.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()
        window = torch.zeros((), device=acc.device)
        for i, b in enumerate(batches(warmup + steps)):
            if i == warmup:
                sync()
                t0 = time.perf_counter()
            if i >= warmup:
                samples, tokens = samples + len(b["input_ids"]), tokens + b["input_ids"].numel()
            loss, _ = train_step(acc, ddp_model, opt, sched, b, loss_fn, t.max_grad_norm)
            window += loss
            if (i + 1) % every == 0:
                float(window)  # the run reads its loss window at logging steps: the same host sync
                window.zero_()
        sync()
        seconds = time.perf_counter() - t0
    acc.unwrap_model(ddp_model, keep_fp32_wrapper=False)
    return {"job": job, "engine_step": "tasks.training.loop.train_step, run DataLoader", "batch_size": t.batch_size, "steps": steps,
            "precision": str(dtype).replace("torch.", "") if dtype else "fp32", "device": device_name(device),
            "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
            "tokens_per_sample": tokens / samples, "tflops_per_s": flops / seconds / 1e12,
            "gflops_per_sample": flops / samples / 1e9, "_device": device}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", default="classify,mlm")
    ap.add_argument("--batch-sizes", default="job,64", help="comma list; 'job' = the job's default batch size")
    ap.add_argument("--steps", type=int, default=40, help="timed optimizer steps per measurement")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default=None, help="cuda, cpu, ... (default: the jobs' own choice, a GPU if present)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak dense bf16 TFLOP/s, for MFU")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("flags", nargs="*", help="finetune flags (after --), applied to every job")
    a = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the new-head notices: the jobs report them, the figures do not need them
    rows = []
    for job in a.jobs.split(","):
        for bs in a.batch_sizes.split(","):
            rows.append(measure(job, a.flags, None if bs == "job" else int(bs), a.steps, a.warmup, a.device))
    peak = peak_tflops(rows[0]["_device"], a.peak_tflops)
    for r in rows:
        r.pop("_device")
        r["mfu"] = r["tflops_per_s"] / peak if peak else None
    print(f"\ntraining step figures on {rows[0]['device']}, peak {peak or '?'} TFLOP/s (dense bf16), "
          f"{a.steps} timed steps after {a.warmup} warm-up steps each")
    print(f"{'job':<10}{'batch':>6}{'precision':>11}{'tokens/sample':>15}{'samples/s':>11}{'tokens/s':>11}"
          f"{'GFLOP/sample':>14}{'TFLOP/s':>9}{'MFU':>8}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['job']:<10}{r['batch_size']:>6}{r['precision']:>11}{r['tokens_per_sample']:>15.1f}"
              f"{r['samples_per_s']:>11.1f}{r['tokens_per_s']:>11.0f}{r['gflops_per_sample']:>14.2f}"
              f"{r['tflops_per_s']:>9.2f}{mfu:>8}")
    if a.json:
        Path(a.json).write_text(json.dumps({"peak_tflops": peak, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
