"""Sequence classification (IMDB sentiment offline; yelp_review_full with 5 classes elsewhere): the recipe.
Engines: `manual` (the core's plain loop) and `trainer` (transformers.Trainer). Metrics: eval_loss (mean
cross-entropy over examples), eval_accuracy, eval_f1 (macro); promotion defaults to macro-F1, which equals accuracy
on balanced data (IMDB) and does not reward predicting the majority class on skewed data."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.jobs import JobSpec, Promotion, Recipe, register
from tasks.predict import predict_classification


class ClassifyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: Literal["manual", "trainer"] = Field("manual", description="manual: plain PyTorch loop; trainer: HF Trainer.")
    num_labels: int | None = Field(None, gt=1, description="Number of classes (default: inferred from the data).")


def load_model(path: str, spec: JobSpec):
    from transformers import AutoModelForSequenceClassification

    from tasks.training import mark_new_weights

    names = spec.label_names or []
    return mark_new_weights(*AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        use_safetensors=True,  # weights as safetensors only: a pickled pytorch_model.bin is refused
        output_loading_info=True,  # which weights are new (the classifier head): head_learning_rate_scale
    ))


def tokenize(data_path: str, model: str, spec: JobSpec) -> str:
    from tasks.tokenize import tokenize_dataset

    return tokenize_dataset(data_path, model, spec.data.max_length, spec.data.pad_to_max_length)


def collator(tok, spec: JobSpec):
    from transformers import DataCollatorWithPadding, default_data_collator

    return default_data_collator if spec.data.pad_to_max_length else DataCollatorWithPadding(tok)


def evaluate(model, loader, device, dtype=None, desc: str = "eval") -> dict[str, Any]:
    from tasks.evaluate import evaluate_classifier

    r = evaluate_classifier(model, loader, device, dtype, desc=desc)
    return {"eval_loss": r["loss"], "eval_accuracy": r["accuracy"], "eval_f1": r["f1"],
            "preds": r["preds"], "labels": r["labels"]}


def trainer_class(spec: JobSpec) -> type:
    from transformers import Trainer

    return Trainer


def trainer_args(spec: JobSpec, output_dir: str, kwargs: dict):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=output_dir, **kwargs)


def check_prediction(out: list) -> str | None:
    if not out or not out[0].get("label") or not (0.0 <= out[0]["score"] <= 1.0):
        return f"malformed classification answer {out!r}"
    return None


def run_tags(info: dict, data) -> dict:
    return {"num_labels": data.num_labels, "label_names": ",".join(data.label_names or [])}


def artifacts(run_dir: str, model_dir: str, extras: dict, spec: JobSpec) -> tuple[list[str], str]:
    """The final model's confusion matrix on the eval split (from the last evaluation's predictions)."""
    from pathlib import Path

    from tasks.evaluate import confusion_matrix_artifacts

    if "preds" not in extras:
        return [], ""
    return confusion_matrix_artifacts(extras["preds"], extras["labels"], spec.label_names, Path(run_dir) / "eval"), ""


def baseline(data_path: str, history: list[dict], spec: JobSpec) -> dict[str, float]:
    """The quality floor: the best input-independent predictor on the run's eval split (see
    `tasks.evaluate.majority_baseline`). A version must beat it to become champion."""
    from tasks.evaluate import majority_baseline

    return majority_baseline(data_path, len(spec.label_names) if spec.label_names else None)


def align_eval(model, spec: JobSpec):
    """A registry model may order its labels differently from this run's data: map batch labels by name."""
    names = spec.label_names or []
    label2id = {str(k): int(v) for k, v in (model.config.label2id or {}).items()}
    if all(n in label2id for n in names):
        to_model = [label2id[n] for n in names]
    elif model.config.num_labels == len(names):
        to_model = list(range(len(names)))
    else:
        raise ValueError(f"model labels {sorted(label2id)} do not match the eval labels {names}")
    if to_model == list(range(len(names))):
        return None
    import torch

    table = torch.tensor(to_model)
    return lambda batch: {**batch, "labels": table[batch["labels"]]}


RECIPE = register(Recipe(
    name="classify",
    description="Fine-tune a sequence classifier (offline default: IMDB sentiment, bundled MiniLM).",
    example="finetune classify --train-samples 2000 --epochs 2 --engine trainer",
    options=ClassifyOptions,
    registered_model="imdb-sentiment-classifier",
    hf_task="text-classification",
    metrics=("eval_loss", "eval_accuracy", "eval_f1"),
    promotion=Promotion("f1", {"accuracy": ("eval_accuracy", True), "f1": ("eval_f1", True), "loss": ("eval_loss", False)}),
    smoke_example="This movie was great!",
    tokenize=tokenize,
    load_model=load_model,
    collator=collator,
    evaluate=evaluate,
    trainer_class=trainer_class,
    trainer_args=trainer_args,
    predict=predict_classification,
    check_prediction=check_prediction,
    run_tags=run_tags,
    artifacts=artifacts,
    align_eval=align_eval,
    baseline=baseline,
    baseline_name="majority-class",
    # Offline default: about 4 minutes on 2 CPU cores (see README: Speed). Length is what IMDB accuracy pays for
    # (measured, one seed: 128 tokens 0.833 on 3,000 or 6,000 reviews; 256 tokens 0.861 on 3,500 in 253 s with
    # length-grouped batches). MiniLM-sized encoders like a higher rate than BERT-base's 5e-5.
    embedded_defaults={"train_samples": 3500, "eval_samples": 1000, "max_length": 256},
    learning_rate=1e-4,
    peft_task_type="SEQ_CLS",
))
