"""The peer of `bench/bench_mlm_job.py`: the plain HF Trainer masked-LM script a user would write for the same job,
as strong as the transformers CPU docs make it (bf16 where the CPU has it natively, dynamic padding, a larger eval
batch, fused AdamW). Stock `AutoModelForMaskedLM` forward (the prediction head over every position) and transformers'
`DataCollatorForLanguageModeling`; each text truncated to max_length (not packed), as `finetune mlm --no-group-texts`
sees them. Same model, texts, masking share, batch, learning rate, schedule, epochs and seed; no tracking.

    .venv/bin/python bench/trainer_mlm.py PREPARED_DATASET_DIR MODEL_DIR OUT_DIR [--epochs 1] ...

Saves the trained model to OUT_DIR/model (so the bench can score it on the job's fixed masks) and prints one JSON
line: its own eval_loss and perplexity (trainer.evaluate(), masks drawn at random), precision used, seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import time

t0 = time.perf_counter()  # imports count: a user's script pays them too

import common  # noqa: E402  (bench/common.py: the recipe flags of --peers same; this script's folder is on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser()
    common.add_train_args(ap, learning_rate=3e-4)
    ap.add_argument("--mlm-probability", type=float, default=0.15)
    a = ap.parse_args()

    from datasets import load_from_disk
    from transformers import (AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainingArguments, set_seed)

    bf16 = a.precision == "bf16" or (a.precision == "auto" and common.native_bf16())
    ds = load_from_disk(a.data)
    tok = AutoTokenizer.from_pretrained(a.model)
    # special_tokens_mask travels to the collator (remove_unused_columns=False below), which pops it: no per-row
    # recomputation of which tokens are special.
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=a.max_length, return_special_tokens_mask=True),
                batched=True, remove_columns=ds["train"].column_names)
    set_seed(a.seed)  # before loading, as run_mlm.py does: a head the checkpoint lacks starts the same every run
    model = AutoModelForMaskedLM.from_pretrained(a.model)
    common.apply_recipe(model, a)
    args = TrainingArguments(
        output_dir=a.out, num_train_epochs=a.epochs, per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=a.eval_batch_size, learning_rate=a.learning_rate,
        warmup_steps=math.ceil(a.warmup_ratio * math.ceil(len(ds["train"]) / a.batch_size) * a.epochs),
        weight_decay=a.weight_decay, lr_scheduler_type=a.lr_scheduler, max_grad_norm=a.max_grad_norm, seed=a.seed,
        bf16=bf16, use_cpu=True, eval_strategy="no", save_strategy="no", logging_steps=50, report_to=[],
        disable_tqdm=True, remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if a.group_by_length else "random",
        optim="adamw_torch_fused",  # as strong as TrainingArguments makes it: one fused optimizer kernel
    )
    collator = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=a.mlm_probability)
    trainer = Trainer(model=model, args=args, train_dataset=ds["train"], eval_dataset=ds["eval"],
                      data_collator=collator, processing_class=tok)
    trainer.train()
    r = trainer.evaluate()
    trainer.save_model(a.out + "/model")
    print(json.dumps({"eval_loss": r["eval_loss"], "perplexity": math.exp(r["eval_loss"]),
                      "precision": "bf16" if bf16 else "fp32", "seconds": time.perf_counter() - t0}))



if __name__ == "__main__":
    main()
