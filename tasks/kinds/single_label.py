"""Single-label classification (one class per text; softmax, cross-entropy): the default kind of `classify`, as
it always was. Adds class weights (`class_weights: balanced | JSON`): weighted cross-entropy in both engines, and
per-class F1 beside the confusion matrix. Metrics eval_loss (unweighted mean cross-entropy), eval_accuracy,
eval_f1 (macro); promotion on macro-F1; floor: the majority class."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tasks.evaluate
from tasks.common import ConfigError
from tasks.data import _encode_labels, _label_classes
from tasks.evaluate import confusion_matrix_artifacts, majority_baseline
from tasks.kinds import pyfunc_rows, weighted_loss

METRICS = ("eval_loss", "eval_accuracy", "eval_f1")
PROMOTION = ("f1", {"accuracy": ("eval_accuracy", True), "f1": ("eval_f1", True), "loss": ("eval_loss", False)})
BASELINE_NAME = "majority-class"
EVAL_FP32 = False  # evaluated and scored in the run's precision (an argmax: bf16 does not move it)


# --- labels ---------------------------------------------------------------------------------------------------

def encode_labels(dd, data, num_labels: int | None):
    """ClassLabel ids in `label` (see `tasks.data._encode_labels`); returns (dataset dict, class names)."""
    return _encode_labels(dd, data.label_column, num_labels)


def check_labels(dd, data, num_labels: int | None) -> None:
    _label_classes(dd, data.label_column, num_labels)


def model_config(names: list[str], opts) -> dict:
    """from_pretrained keyword arguments of the head (as before: problem_type left to transformers)."""
    return dict(num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})


# --- class weights --------------------------------------------------------------------------------------------

def parse_weights(value: str | None, names: list[str], what: str = "--class-weights") -> dict[str, float] | None:
    """`none` -> None; a JSON object {label: weight} -> weights for every label (labels not named get 1.0).
    Unknown labels, non-numeric or non-positive weights are a ConfigError. `balanced` is resolved elsewhere."""
    if value in (None, "", "none"):
        return None
    try:
        raw = json.loads(value)
    except ValueError:
        raise ConfigError(f"{what} {value!r}: use none, balanced or a JSON object like "
                          "'{\"negative\": 1.0, \"positive\": 3.0}'") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{what} {value!r}: a JSON object {{label: weight}} is needed")
    unknown = [k for k in raw if str(k) not in names]
    if unknown:
        raise ConfigError(f"{what} names labels {unknown} that are not in the data (labels: {names})")
    bad = {k: v for k, v in raw.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0}
    if bad:
        raise ConfigError(f"{what}: weights must be positive numbers, got {bad}")
    return {n: float(raw.get(n, 1.0)) for n in names}


def balanced_weights(counts: list[int], names: list[str]) -> dict[str, float]:
    """sklearn's `balanced`: n / (classes x count of the class); a class absent from train gets 1.0."""
    n, k = sum(counts), len(counts)
    return {name: (n / (k * c) if c else 1.0) for name, c in zip(names, counts)}


def resolve(spec, data_path: str):
    """The spec with `class_weights` as explicit JSON weights for every label (`balanced` from the train split's
    counts): what the loss uses, logged, and saved beside the model."""
    value = spec.options.get("class_weights") or "none"
    names = spec.label_names or []
    if value == "none":
        return spec
    if value == "balanced":
        from datasets import load_from_disk

        labels = load_from_disk(data_path)["train"]["label"]
        weights = balanced_weights([sum(1 for x in labels if x == i) for i in range(len(names))], names)
    else:
        weights = parse_weights(value, names)
    return spec.model_copy(update={"options": {**spec.options, "class_weights": json.dumps(weights)}})


def weights_of(spec) -> dict[str, float] | None:
    value = spec.options.get("class_weights") or "none"
    if value in ("none", "balanced"):
        return None
    return parse_weights(value, spec.label_names or [])


def loss_for(spec):
    """(model, batch) -> weighted cross-entropy with the spec's resolved class weights; None without weights (the
    model's own loss)."""
    import torch.nn.functional as F

    return weighted_loss(spec, weights_of(spec), lambda logits, labels, w: F.cross_entropy(logits, labels, weight=w))


def init_model(model, tokenized_path: str, spec) -> None:
    """Nothing data-dependent to initialise (see regression)."""


# --- evaluation -----------------------------------------------------------------------------------------------

def evaluate(model, loader, device, dtype=None, desc: str = "eval") -> dict[str, Any]:
    r = tasks.evaluate.evaluate_classifier(model, loader, device, dtype, desc=desc)
    return {"eval_loss": r["loss"], "eval_accuracy": r["accuracy"], "eval_f1": r["f1"],
            "preds": r["preds"], "labels": r["labels"]}


def baseline(data_path: str, history: list[dict], spec) -> dict[str, float]:
    """The best input-independent predictor on the run's eval split (`tasks.evaluate.majority_baseline`)."""
    return majority_baseline(data_path, len(spec.label_names) if spec.label_names else None)


def artifacts(run_dir: str, extras: dict, spec) -> tuple[list[str], str]:
    """The confusion matrix, per-class F1 and the class weights used (when any), under eval/."""
    from sklearn.metrics import f1_score

    if "preds" not in extras:
        return [], ""
    out = Path(run_dir) / "eval"
    names = spec.label_names or []
    paths = confusion_matrix_artifacts(extras["preds"], extras["labels"], names, out)
    f1 = f1_score(extras["labels"], extras["preds"], labels=list(range(len(names))), average=None, zero_division=0)
    per_class = {n: round(float(v), 6) for n, v in zip(names, f1)}
    (out / "per_class_f1.json").write_text(json.dumps(per_class, indent=2))
    paths.append(str(out / "per_class_f1.json"))
    text = ""
    weights = weights_of(spec)
    if weights:
        (out / "class_weights.json").write_text(json.dumps(weights, indent=2))
        paths.append(str(out / "class_weights.json"))
        text = "  class weights          " + ", ".join(f"{k} {v:.3g}" for k, v in weights.items())
        text += "\n  per-class F1           " + ", ".join(f"{k} {v:.3f}" for k, v in per_class.items())
    return paths, text


def align_eval(model, spec):
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


# --- prediction and serving -----------------------------------------------------------------------------------

def predict(model_uri: str, texts: list[str], top_k: int = 5, meta: dict | None = None) -> list[dict]:
    """Through pyfunc, as `mlflow models serve` answers: label name and score per text (a pair: `A ||| B`)."""
    rows = pyfunc_rows(model_uri, texts, meta or {})
    return [{"text": t, "label": str(row["label"]), "score": float(row["score"])}
            for t, row in zip(texts, rows)]


def check_prediction(out: list) -> str | None:
    if not out or not out[0].get("label") or not (0.0 <= out[0]["score"] <= 1.0):
        return f"malformed classification answer {out!r}"
    return None


def serving(config: dict) -> dict:
    return {}
