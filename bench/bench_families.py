"""Benchmark: the project's default classify training step (TrainConfig defaults: dropout 0, frozen token
embeddings, attention auto, fused AdamW, precision auto) and the mlm step (masked-LM loss through the sparse head,
`tasks.jobs.mlm.masked_lm_loss`) on a tiny random model of each encoder family (tests/conftest.py `build_family`:
2 layers, 32 wide, the family's own tokenizer), batch 16 x 128 tokens. The batch carries what the model takes
(`tasks.tokenize.batch_inputs`). Shows that no family fell to a slow path unannounced: the figures are tiny-model
step costs, comparable between families of one run only (the embedding/vocabulary matmuls dominate at this width:
a 2,000-piece tokenizer's model is cheaper than a 30,522-piece WordPiece one); each row also as a ratio to BERT's.

    .venv/bin/python bench/bench_families.py [--rounds 2]

On a shared machine the figures move with the other processes' load: the rounds alternate the families, each row
gives the spread of its round medians (max/min) and the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
BATCH, LENGTH, STEPS, WARMUP = 16, 128, 10, 3


def step_seconds(path: str, job: str) -> float:
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

    from tasks.device import amp_dtype, autocast, select_device
    from tasks.jobs.mlm import _SPARSE_OK, masked_lm_loss
    from tasks.tokenize import batch_inputs
    from tasks.training import TrainConfig, attention_implementation, prepare_for_training, training_attention

    device = select_device("auto")
    dtype = amp_dtype(device, "auto")
    torch.manual_seed(0)
    tok, cfg = AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    auto = AutoModelForSequenceClassification if job == "classify" else AutoModelForMaskedLM
    model = (auto.from_pretrained(path, num_labels=2) if job == "classify" else auto.from_pretrained(path)).to(device)
    t = TrainConfig()
    prepare_for_training(model, t)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(5, min(len(tok), cfg.vocab_size), (BATCH, LENGTH), device=device)
    batch = {"input_ids": ids}
    names = batch_inputs(tok, cfg, auto.__name__)
    if "attention_mask" in names:
        batch["attention_mask"] = torch.ones_like(ids)
    if "token_type_ids" in names:
        batch["token_type_ids"] = torch.zeros_like(ids)
    if job == "classify":
        batch["labels"] = torch.randint(0, 2, (BATCH,), device=device)
    else:  # 15% of positions carry a label, as the masking collator leaves them
        labels = torch.full_like(ids, -100)
        pick = torch.rand(ids.shape, device=device) < 0.15
        labels[pick] = ids[pick]
        batch["labels"] = labels
    model.train()
    times = []
    with attention_implementation(model, training_attention(t, device, dtype)):
        for i in range(WARMUP + STEPS):
            t0 = time.perf_counter()
            with autocast(device, dtype):
                loss = model(**batch).loss if job == "classify" else masked_lm_loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= WARMUP:
                times.append(time.perf_counter() - t0)
    if job == "mlm":
        assert _SPARSE_OK.get(type(model)), f"{type(model).__name__} fell back to the full head"
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="passes over all families (the median of each is kept)")
    rounds = ap.parse_args().rounds
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from conftest import FAMILIES, build_family
    from tasks.device import amp_dtype, describe, select_device

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {f: build_family(f, Path(tmp) / f) for f in FAMILIES}
        tokenizers = {f: type(AutoTokenizer.from_pretrained(d)).__name__ for f, d in dirs.items()}
        runs = {(f, j): [] for f in FAMILIES for j in ("classify", "mlm")}
        load_before = os.getloadavg()[0]
        for _ in range(rounds):  # families alternate, so load from other processes hits them alike
            for (f, j) in runs:
                runs[(f, j)].append(step_seconds(dirs[f], j))
    device = select_device("auto")
    print(f"\ntraining step on tiny models (2 layers, 32 wide), batch {BATCH} x {LENGTH} tokens, "
          f"{describe(device, amp_dtype(device, 'auto'))}, {os.cpu_count()} CPUs, median of {STEPS} steps x {rounds} "
          f"rounds; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    rate = {k: BATCH / statistics.median(v) for k, v in runs.items()}
    spread = {k: max(v) / min(v) for k, v in runs.items()}
    print(f"{'family':<13}{'tokenizer':<21}{'classify samples/s':>19}{'x BERT':>8}{'spread':>8}"
          f"{'mlm (sparse head) samples/s':>29}{'x BERT':>8}{'spread':>8}")
    for f in FAMILIES:
        c, m = rate[(f, "classify")], rate[(f, "mlm")]
        print(f"{f:<13}{tokenizers[f]:<21}{c:>19.0f}{c / rate[('bert', 'classify')]:>8.2f}"
              f"{spread[(f, 'classify')]:>8.2f}{m:>29.0f}{m / rate[('bert', 'mlm')]:>8.2f}{spread[(f, 'mlm')]:>8.2f}")


if __name__ == "__main__":
    main()
