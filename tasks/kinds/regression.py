"""Regression (a number per text: a rating, a score, a similarity): one output, MSE loss (transformers'
problem_type "regression"). The label column holds numbers (ints, floats, or numeric strings); anything else is a
ConfigError naming the row. Metrics: eval_loss (MSE), eval_rmse, eval_mae, eval_pearson, eval_spearman (0 when
either side is constant); promotion on RMSE, lower is better; floor: predicting the eval split's mean for every
text (RMSE = the labels' standard deviation, correlations 0). Predict returns the number."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tasks.common import ConfigError
from tasks.evaluate import eval_loop
from tasks.kinds import pyfunc_rows
from tasks.training import NEW_WEIGHTS

METRICS = ("eval_loss", "eval_rmse", "eval_mae", "eval_pearson", "eval_spearman")
PROMOTION = ("rmse", {"rmse": ("eval_rmse", False), "mae": ("eval_mae", False), "pearson": ("eval_pearson", True),
                      "spearman": ("eval_spearman", True), "loss": ("eval_loss", False)})
BASELINE_NAME = "predict-the-mean"
# Evaluated (tasks.jobs.classify.evaluate) and, at precision auto, batch-scored (tasks.scoring.Scorer) in fp32,
# whatever the run trains in: the output is the number itself,
# and bf16 has steps of 1/64 near 3 (a tiny model's distinct outputs collapsed to 2 values, Pearson 0)
EVAL_FP32 = True


# --- labels ---------------------------------------------------------------------------------------------------

def _number(v) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            return None
    return None


def _values(dd, label_col: str) -> dict[str, list[float]]:
    from datasets import ClassLabel

    out, problems = {}, []
    for split, ds in dd.items():
        feat = ds.features[label_col]
        vals = ds[label_col]
        if isinstance(feat, ClassLabel):  # e.g. the embedded reviews' 0/1: the class ids are the numbers
            out[split] = [float(v) for v in vals]
            continue
        nums = []
        for i, v in enumerate(vals):
            x = _number(v)
            if v is None:
                problems.append(f"row {i} of split {split!r} has no label (empty or NA): regression needs a number "
                                "in every row; fill or drop it")
                break
            if x is None or not math.isfinite(x):
                problems.append(f"label {v!r} in row {i} of split {split!r} is not a number: regression needs a "
                                f"numeric label column ({label_col!r}); fix or drop that row, or use "
                                "--problem single_label for class names")
                break
            nums.append(x)
        out[split] = nums
    if problems:
        raise ConfigError(problems)
    return out


def check_labels(dd, data, num_labels: int | None) -> None:
    if num_labels not in (None, 1):
        raise ConfigError(f"num_labels={num_labels}: regression predicts one number; drop --num-labels")
    vals = _values(dd, data.label_column)
    flat = [x for v in vals.values() for x in v]
    if len(set(flat)) < 2:
        raise ConfigError(f"label column {data.label_column!r} holds a single value: nothing to regress on")


def encode_labels(dd, data, num_labels: int | None):
    """`label` becomes float32; the one "label name" is the label column's (the output's name)."""
    from datasets import DatasetDict, Value

    check_labels(dd, data, num_labels)
    vals = _values(dd, data.label_column)
    out = {split: ds.remove_columns(data.label_column).add_column("label", vals[split], feature=Value("float32"))
           for split, ds in dd.items()}
    return DatasetDict(out), [data.label_column]


def model_config(names: list[str], opts) -> dict:
    return dict(num_labels=1, id2label={0: names[0]}, label2id={names[0]: 0}, problem_type="regression")


def init_model(model, tokenized_path: str, spec) -> None:
    """The new output's bias starts at the train split's mean label (the floor's prediction), not at 0: with
    labels far from 0 (ratings 1-5) the first epochs would otherwise go to moving the output up to their level
    (measured, bundled MiniLM, 63 steps: RMSE 1.52 against the mean's 1.55 from a zero bias). Found
    family-agnostically: the one new one-element parameter (transformers' loading info: the head's bias)."""
    import numpy as np
    import torch
    from datasets import load_from_disk

    new = getattr(model, NEW_WEIGHTS, set())
    biases = [p for p in model.parameters() if id(p) in new and p.ndim == 1 and p.numel() == 1]
    if len(biases) != 1:
        return
    labels = np.asarray(load_from_disk(tokenized_path)["train"].with_format("numpy")["labels"], dtype=np.float64)
    with torch.no_grad():
        biases[0].fill_(float(labels.mean()))


def resolve(spec, data_path: str):
    return spec


def loss_for(spec):
    return None  # the model's own MSE


# --- evaluation -----------------------------------------------------------------------------------------------

def scores(pred, gold) -> dict[str, float]:
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    pred, gold = np.asarray(pred, dtype=float), np.asarray(gold, dtype=float)
    err = pred - gold
    # a constant side has no correlation to speak of (scipy would give nan)
    constant = len(set(pred.tolist())) < 2 or len(set(gold.tolist())) < 2
    return {"loss": float((err ** 2).mean()), "rmse": float(math.sqrt((err ** 2).mean())),
            "mae": float(np.abs(err).mean()),
            "pearson": 0.0 if constant else float(pearsonr(pred, gold)[0]),
            "spearman": 0.0 if constant else float(spearmanr(pred, gold)[0])}


def evaluate(model, loader, device, dtype=None, desc: str = "eval") -> dict[str, Any]:
    """RMSE, MAE, Pearson and Spearman of the outputs against the labels; eval_loss is their MSE (computed from
    the same fp32 outputs, so eval_rmse = sqrt(eval_loss) exactly)."""
    import torch

    preds, labels = [], []

    def each(out, batch):  # kept on the device: read once, after the loop
        preds.append(out.logits.float().reshape(-1))
        labels.append(batch["labels"].float().reshape(-1))

    eval_loop(model, loader, device, dtype, desc, each)  # None from the recipe: EVAL_FP32
    preds = torch.cat(preds).tolist() if preds else []
    labels = torch.cat(labels).tolist() if labels else []
    m = scores(preds, labels)
    return {**{f"eval_{k}": v for k, v in m.items()}, "preds": preds, "labels": labels}


def baseline(data_path: str, history: list[dict], spec) -> dict[str, float]:
    """The eval split's mean predicted for every text: the constant with the lowest MSE and RMSE there."""
    from datasets import load_from_disk

    gold = [float(x) for x in load_from_disk(str(data_path))["eval"]["label"]]
    if not gold:
        raise ValueError("the eval split is empty: no baseline")
    mean = sum(gold) / len(gold)
    return scores([mean] * len(gold), gold)


def artifacts(run_dir: str, extras: dict, spec) -> tuple[list[str], str]:
    """predictions_vs_labels.png (a scatter of the eval split) and residuals.json (summary), under eval/."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "preds" not in extras:
        return [], ""
    out = Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    pred, gold = extras["preds"], extras["labels"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(gold, pred, s=6, alpha=0.5)
    lo, hi = min(min(gold), min(pred)), max(max(gold), max(pred))
    ax.plot([lo, hi], [lo, hi], lw=1, color="grey")
    ax.set_xlabel("label")
    ax.set_ylabel("prediction")
    ax.set_title("eval split")
    fig.tight_layout()
    fig.savefig(out / "predictions_vs_labels.png", dpi=100)
    plt.close(fig)
    (out / "regression_summary.json").write_text(json.dumps(
        {**scores(pred, gold), "label_mean": sum(gold) / len(gold), "prediction_mean": sum(pred) / len(pred),
         "n": len(gold)}, indent=2))
    return [str(out / "predictions_vs_labels.png"), str(out / "regression_summary.json")], ""


def align_eval(model, spec):
    if model.config.num_labels != 1:
        raise ValueError(f"model has {model.config.num_labels} outputs: not a regression model")
    return None


# --- prediction and serving -----------------------------------------------------------------------------------

def predict(model_uri: str, texts: list[str], top_k: int = 5, meta: dict | None = None) -> list[dict]:
    """The number per text: [{text, label (the output's name), value}]. pyfunc answers (label, score) with the
    raw output as the score (transformers applies no function for problem_type regression)."""
    rows = pyfunc_rows(model_uri, texts, meta or {})
    return [{"text": t, "label": str(row["label"]), "value": float(row["score"])}
            for t, row in zip(texts, rows)]


def check_prediction(out: list) -> str | None:
    if not out or not isinstance(out[0].get("value"), float) or not math.isfinite(out[0]["value"]):
        return f"malformed regression answer {out!r}"
    return None


def serving(config: dict) -> dict:
    return {"metadata": {"problem": "regression"}}
