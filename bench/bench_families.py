"""Benchmark: the project's default classify training step (TrainConfig defaults: dropout 0, frozen token
embeddings, attention auto, fused AdamW, precision auto) and the mlm step (masked-LM loss through the sparse head,
`tasks.jobs.mlm.masked_lm_loss`) on a tiny random model of each encoder family (tests/conftest.py `build_family`:
2 layers, 32 wide, the family's own tokenizer), batch 16 x 128 tokens. The batch carries what the model takes
(`tasks.tokenize.batch_inputs`). Shows that no family fell to a slow path unannounced: the figures are tiny-model
step costs, comparable between families of one run only (the embedding/vocabulary matmuls dominate at this width).

    .venv/bin/python bench/bench_families.py
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
BATCH, LENGTH, STEPS, WARMUP, ROUNDS = 16, 128, 10, 3, 2


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
    from transformers.utils import logging as hf_logging

    from conftest import FAMILIES, build_family
    from tasks.device import amp_dtype, describe, select_device

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {f: build_family(f, Path(tmp) / f) for f in FAMILIES}
        runs = {(f, j): [] for f in FAMILIES for j in ("classify", "mlm")}
        for _ in range(ROUNDS):  # families alternate, so load from other processes hits them alike
            for (f, j) in runs:
                runs[(f, j)].append(step_seconds(dirs[f], j))
    device = select_device("auto")
    print(f"\ntraining step on tiny models (2 layers, 32 wide), batch {BATCH} x {LENGTH} tokens, "
          f"{describe(device, amp_dtype(device, 'auto'))}, median of {STEPS} steps x {ROUNDS} rounds")
    print(f"{'family':<12}{'classify samples/s':>20}{'mlm (sparse head) samples/s':>30}")
    for f in FAMILIES:
        c, m = (statistics.median(runs[(f, j)]) for j in ("classify", "mlm"))
        print(f"{f:<12}{BATCH / c:>20.0f}{BATCH / m:>30.0f}")


if __name__ == "__main__":
    main()
