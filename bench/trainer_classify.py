"""The peer of `bench/bench_job.py`: the plain HF Trainer script a user would write for the same job, as strong as
the transformers CPU docs make it (bf16 where the CPU has it natively, dynamic padding, a larger eval batch, fused
AdamW).
Same model, examples, length, batch, learning rate, schedule and epochs as `finetune classify`; no tracking.

    .venv/bin/python bench/trainer_classify.py PREPARED_DATASET_DIR MODEL_DIR OUT_DIR [--epochs 1] ...

Prints one JSON line: accuracy, f1, precision used, seconds.
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
    common.add_train_args(ap, learning_rate=1e-4)
    a = ap.parse_args()

    import numpy as np
    from datasets import load_from_disk
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    bf16 = a.precision == "bf16" or (a.precision == "auto" and common.native_bf16())
    ds = load_from_disk(a.data)
    names = ds["train"].features["label"].names if hasattr(ds["train"].features["label"], "names") else None
    tok = AutoTokenizer.from_pretrained(a.model)
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=a.max_length), batched=True,
                remove_columns=[c for c in ds["train"].column_names if c != "label"])
    n = len(names) if names else len(set(ds["train"]["label"]))
    set_seed(a.seed)  # the new head's initial weights: seeded as in the job (Trainer seeds only after this)
    model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=n)
    common.apply_recipe(model, a)
    args = TrainingArguments(
        output_dir=a.out, num_train_epochs=a.epochs, per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=a.eval_batch_size, learning_rate=a.learning_rate,
        warmup_steps=math.ceil(a.warmup_ratio * math.ceil(len(ds["train"]) / a.batch_size) * a.epochs),
        weight_decay=a.weight_decay, lr_scheduler_type=a.lr_scheduler, max_grad_norm=a.max_grad_norm, seed=a.seed, bf16=bf16, use_cpu=True,
        eval_strategy="no", save_strategy="no", logging_steps=50, report_to=[], disable_tqdm=True,
        train_sampling_strategy="group_by_length" if a.group_by_length else "random",
        optim="adamw_torch_fused",  # as strong as TrainingArguments makes it: one fused optimizer kernel
    )

    def metrics(p):
        pred = np.argmax(p.predictions, -1)
        return {"accuracy": accuracy_score(p.label_ids, pred), "f1": f1_score(p.label_ids, pred, average="macro")}

    trainer = Trainer(model=model, args=args, train_dataset=ds["train"], eval_dataset=ds["eval"],
                      data_collator=DataCollatorWithPadding(tok), processing_class=tok, compute_metrics=metrics)
    trainer.train()
    r = trainer.evaluate()
    trainer.save_model(a.out + "/model")
    print(json.dumps({"accuracy": r["eval_accuracy"], "f1": r["eval_f1"], "precision": "bf16" if bf16 else "fp32",
                      "seconds": time.perf_counter() - t0}))



if __name__ == "__main__":
    main()
