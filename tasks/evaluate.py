"""Evaluation: loss, accuracy and macro-F1 for classifiers, the majority-class baseline, the confusion matrix and loss
curve of the final model, and the probe scores a registered model is checked against (`tasks.promotion`)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from tasks.device import autocast
from tasks.output import progress_bars


def classification_metrics(preds, labels, num_labels: int) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "f1": float(f1_score(labels, preds, average="macro", labels=list(range(num_labels)), zero_division=0)),
    }


def majority_baseline(data_path: str, num_labels: int | None = None) -> dict[str, float]:
    """Scores of the trivial classifier on the eval split of a prepared dataset, by canonical promotion metric:
    the best any input-independent predictor can do on exactly those labels.
      accuracy, f1  the majority class of the eval split predicted for every example (macro-F1 over all classes,
                    computed as the model's eval_f1 is; predicting the most frequent class maximises both, so no
                    constant predictor can beat the floor, it can only tie it)
      loss          cross-entropy of predicting the eval label frequencies for every example, i.e. their entropy
                    (the lowest mean cross-entropy any constant distribution reaches; always finite)
    With stratified splits (the default) the eval majority and frequencies are the train ones."""
    import math
    from collections import Counter

    from datasets import load_from_disk

    ev = load_from_disk(str(data_path))["eval"]
    labels = list(ev["label"])
    if not labels:
        raise ValueError("the eval split is empty: no baseline")
    n = num_labels or ev.features["label"].num_classes
    counts = Counter(labels)
    majority = min(counts, key=lambda c: (-counts[c], c))  # most frequent; lowest id on a tie
    total = len(labels)
    entropy = -sum(k / total * math.log(k / total) for k in counts.values())
    return {**classification_metrics([majority] * total, labels, n), "loss": entropy}


def eval_loop(model, loader, device, dtype=None, desc: str = "eval",
              each: Callable[[Any, dict], None] | None = None) -> float:
    """The one evaluation loop of every kind: `model` over `loader` in eval mode, under `torch.inference_mode` and
    the run's autocast, calling `each(outputs, batch)` per batch (the batch on `device`; keep what it needs as
    device tensors and read them once at the end). Returns the mean of the model's loss over examples: summed on
    the device and read once (no host sync per batch on a GPU); nan when the model computes no loss. The
    model's train/eval mode is restored afterwards."""
    import torch
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    total, n = torch.zeros((), dtype=torch.float64 if device.type != "mps" else torch.float32, device=device), 0
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc=desc, leave=False, disable=not progress_bars()):
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast(device, dtype):
                    out = model(**batch)
                bs = next(iter(batch.values())).shape[0]
                if getattr(out, "loss", None) is not None:
                    total += out.loss.detach().to(total.dtype) * bs
                    n += bs
                if each is not None:
                    each(out, batch)
            mean = total.item() / n if n else math.nan  # the one read of the loss
    finally:
        model.train(was_training)
    return mean


def evaluate_classifier(model, loader, device, dtype=None, desc: str = "eval") -> dict[str, Any]:
    """Mean loss over examples, accuracy, macro-F1, and the predictions (for the confusion matrix)."""
    import torch

    preds, labels = [], []

    def each(out, batch):  # kept on the device: read once, after the loop
        preds.append(out.logits.argmax(-1))
        labels.append(batch["labels"])

    loss = eval_loop(model, loader, device, dtype, desc, each)
    preds = torch.cat(preds).tolist() if preds else []
    labels = torch.cat(labels).tolist() if labels else []
    m = classification_metrics(preds, labels, model.config.num_labels)
    return {"loss": loss, **m, "preds": preds, "labels": labels}


def confusion_matrix_artifacts(preds, labels, label_names: list[str], out_dir: str | Path) -> list[str]:
    """Writes confusion_matrix.json and .png; returns their paths (logged to MLflow by the tracking task)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cm = confusion_matrix(labels, preds, labels=list(range(len(label_names))))
    (out / "confusion_matrix.json").write_text(json.dumps({"labels": label_names, "matrix": cm.tolist()}, indent=2))
    fig, ax = plt.subplots(figsize=(1.2 * len(label_names) + 2, 1.2 * len(label_names) + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(label_names)), label_names, rotation=45, ha="right")
    ax.set_yticks(range(len(label_names)), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title("confusion matrix (eval split)")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=100)
    plt.close(fig)
    return [str(out / "confusion_matrix.json"), str(out / "confusion_matrix.png")]


def loss_curve_artifact(history: list[dict], out_dir: str | Path, step_losses: list[tuple[int, float]] | None = None,
                        steps_per_epoch: int | None = None) -> str:
    """loss_curve.png: the training loss every few steps (a curve even with one epoch) and the per-epoch train and
    eval losses, on one epoch axis (a step s is at s / steps_per_epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    if step_losses and steps_per_epoch:
        xs, ys = zip(*[(s / steps_per_epoch, v) for s, v in step_losses])
        ax.plot(xs, ys, lw=1, alpha=0.7, label="train_loss_step")
    for key in ("train_loss", "eval_loss"):
        pts = [(h["epoch"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=100)
    plt.close(fig)
    return str(out / "loss_curve.png")


PROBE_ROWS = 8


def probe_scores(model, loader, spec, device, dtype, rows: int = PROBE_ROWS) -> dict[str, float]:
    """The job's evaluation on the first `rows` eval examples: a cheap fingerprint of what a model computes, so the
    logged model can be checked against the trained one without evaluating it again on the whole split."""
    first = next(iter(loader))
    probe = {k: v[:rows] for k, v in first.items()}
    r = spec.recipe.evaluate(model, [probe], device, dtype, desc="probe")
    return {k: v for k, v in r.items() if isinstance(v, float)}
