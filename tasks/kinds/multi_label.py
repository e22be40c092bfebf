"""Multi-label classification (a set of labels per text; one sigmoid per label, binary cross-entropy per label).
The label column holds a list (JSON, JSONL, Parquet) or a delimited string (`data.label_separator`, e.g.
"action|comedy"); the labels are the sorted union over the data. A label is predicted when its sigmoid score is
above `threshold` (as `finetune score` does) (default 0.5; recorded on the model and in the logged model's metadata).
Metrics: eval_loss (mean binary cross-entropy over labels), eval_f1 (macro-F1 over labels), eval_micro_f1,
eval_subset_accuracy (the whole set right); per-label F1 as an artifact. Promotion on macro-F1 by default;
floor: the majority label set (the most frequent set of the eval split, predicted for every text).
Imbalance: `class_weights: balanced | JSON` sets BCE's `pos_weight` per label (balanced: negatives / positives of
the train split)."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from tasks.common import ConfigError
from tasks.evaluate import eval_loop
from tasks.kinds import pyfunc_rows, weighted_loss
from tasks.kinds.single_label import parse_weights

METRICS = ("eval_loss", "eval_f1", "eval_micro_f1", "eval_subset_accuracy")
PROMOTION = ("f1", {"f1": ("eval_f1", True), "micro_f1": ("eval_micro_f1", True),
                    "subset_accuracy": ("eval_subset_accuracy", True), "loss": ("eval_loss", False)})
BASELINE_NAME = "majority-label-set"
EVAL_FP32 = False  # evaluated and scored in the run's precision
DEFAULT_THRESHOLD = 0.5


# --- labels ---------------------------------------------------------------------------------------------------

def _label_sets(dd, label_col: str, separator: str | None) -> tuple[dict[str, list[list[str]]], list[str]]:
    """Each split's label sets (lists of label names) and the sorted union; bad rows are one ConfigError."""
    sets, problems = {}, []
    for split, ds in dd.items():
        rows = []
        for i, v in enumerate(ds[label_col]):
            if isinstance(v, str):
                if separator is None:
                    problems.append(f"label column {label_col!r} holds strings ({v!r} in split {split!r}): pass "
                                    "--label-separator (e.g. '|') for delimited labels, or use a list column "
                                    "(JSON/Parquet)")
                    break
                labels = [x.strip() for x in v.split(separator)]
            elif isinstance(v, (list, tuple)):
                labels = [str(x).strip() if not isinstance(x, str) else x.strip() for x in v if x is not None]
            elif v is None:
                labels = []
            else:
                problems.append(f"label column {label_col!r} holds {type(v).__name__} values ({v!r} in split "
                                f"{split!r}): multi-label needs a list of labels or a delimited string")
                break
            labels = sorted({x for x in labels if x})
            if not labels:
                problems.append(f"row {i} of split {split!r} has an empty label set ({v!r}): every text needs at "
                                "least one label; drop or fill those rows")
                break
            rows.append(labels)
        sets[split] = rows
    if problems:
        raise ConfigError(problems)
    names = sorted({x for rows in sets.values() for r in rows for x in r})
    if len(names) < 2:
        raise ConfigError(f"label column {label_col!r} has {len(names)} distinct label(s) {names}: multi-label "
                          "needs at least 2")
    return sets, names


def check_labels(dd, data, num_labels: int | None) -> None:
    _, names = _label_sets(dd, data.label_column, data.label_separator)
    if num_labels is not None and num_labels != len(names):
        raise ConfigError(f"num_labels={num_labels} but the data has {len(names)} labels {names[:10]}: drop --num-labels")


def encode_labels(dd, data, num_labels: int | None):
    """`label` becomes a multi-hot float32 vector over the sorted label names; returns (dataset dict, names)."""
    from datasets import DatasetDict, List, Value

    check_labels(dd, data, num_labels)
    sets, names = _label_sets(dd, data.label_column, data.label_separator)
    index = {n: i for i, n in enumerate(names)}
    out = {}
    for split, ds in dd.items():
        hot = [[0.0] * len(names) for _ in sets[split]]
        for row, labels in zip(hot, sets[split]):
            for x in labels:
                row[index[x]] = 1.0
        ds = ds.remove_columns(data.label_column)
        out[split] = ds.add_column("label", hot, feature=List(Value("float32")))
    return DatasetDict(out), names


def model_config(names: list[str], opts) -> dict:
    return dict(num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
                problem_type="multi_label_classification",
                config_attrs={"finetune_threshold": float(opts.threshold)})


# --- pos_weight -----------------------------------------------------------------------------------------------

def resolve(spec, data_path: str):
    """`class_weights` as explicit per-label pos_weight JSON (`balanced`: negatives / positives in train)."""
    value = spec.options.get("class_weights") or "none"
    names = spec.label_names or []
    if value == "none":
        return spec
    if value == "balanced":
        from datasets import load_from_disk

        rows = load_from_disk(data_path)["train"]["label"]
        pos = [sum(r[i] for r in rows) for i in range(len(names))]
        weights = {n: (len(rows) - p) / p if p else 1.0 for n, p in zip(names, pos)}
    else:
        weights = parse_weights(value, names)
    return spec.model_copy(update={"options": {**spec.options, "class_weights": json.dumps(weights)}})


def weights_of(spec) -> dict[str, float] | None:
    value = spec.options.get("class_weights") or "none"
    return None if value in ("none", "balanced") else parse_weights(value, spec.label_names or [])


def loss_for(spec):
    """(model, batch) -> BCE with logits and the resolved pos_weight; None without weights (the model's own)."""
    import torch.nn.functional as F

    return weighted_loss(spec, weights_of(spec), lambda logits, labels, w: F.binary_cross_entropy_with_logits(
        logits, labels.float(), pos_weight=w))


def init_model(model, tokenized_path: str, spec) -> None:
    """Nothing data-dependent to initialise (see regression)."""


# --- evaluation -----------------------------------------------------------------------------------------------

def scores(pred, gold) -> dict[str, float]:
    """Macro-F1 and micro-F1 over labels and subset accuracy, for 0/1 matrices (rows: texts)."""
    import numpy as np
    from sklearn.metrics import f1_score

    pred, gold = np.asarray(pred, dtype=int), np.asarray(gold, dtype=int)
    return {"f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
            "micro_f1": float(f1_score(gold, pred, average="micro", zero_division=0)),
            "subset_accuracy": float((pred == gold).all(axis=1).mean())}


def evaluate(model, loader, device, dtype=None, desc: str = "eval") -> dict[str, Any]:
    """Mean BCE (the model's own loss), the metrics at the model's threshold, and the 0/1 predictions."""
    import torch

    threshold = float(getattr(model.config, "finetune_threshold", DEFAULT_THRESHOLD))
    preds, labels = [], []

    def each(out, batch):  # kept on the device: read once, after the loop
        preds.append(torch.sigmoid(out.logits.float()) > threshold)
        labels.append(batch["labels"].round().int())

    loss = eval_loop(model, loader, device, dtype, desc, each)
    preds = torch.cat(preds).int().tolist() if preds else []
    labels = torch.cat(labels).tolist() if labels else []
    m = scores(preds, labels)
    return {"eval_loss": loss, "eval_f1": m["f1"], "eval_micro_f1": m["micro_f1"],
            "eval_subset_accuracy": m["subset_accuracy"], "preds": preds, "labels": labels}


def baseline(data_path: str, history: list[dict], spec) -> dict[str, float]:
    """The majority label set of the eval split predicted for every text (lowest sorted set on a tie); loss: the
    mean BCE of predicting each label's eval frequency for every text (the best constant probabilities)."""
    from datasets import load_from_disk

    rows = [tuple(int(round(x)) for x in r) for r in load_from_disk(str(data_path))["eval"]["label"]]
    if not rows:
        raise ValueError("the eval split is empty: no baseline")
    counts = Counter(rows)
    majority = min(counts, key=lambda s: (-counts[s], s))
    m = scores([majority] * len(rows), rows)
    k = len(rows[0])
    freq = [sum(r[i] for r in rows) / len(rows) for i in range(k)]
    ent = [-(p * math.log(p) + (1 - p) * math.log(1 - p)) if 0 < p < 1 else 0.0 for p in freq]
    return {**m, "loss": sum(ent) / k}


def artifacts(run_dir: str, extras: dict, spec) -> tuple[list[str], str]:
    """per_label_f1.json (F1, precision, recall, support per label) and the pos_weight used, under eval/."""
    import numpy as np
    from sklearn.metrics import precision_recall_fscore_support

    if "preds" not in extras:
        return [], ""
    out = Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    names = spec.label_names or []
    p, r, f, s = precision_recall_fscore_support(np.asarray(extras["labels"]), np.asarray(extras["preds"]),
                                                 zero_division=0)
    per = {n: {"f1": round(float(f[i]), 6), "precision": round(float(p[i]), 6), "recall": round(float(r[i]), 6),
               "support": int(s[i])} for i, n in enumerate(names)}
    (out / "per_label_f1.json").write_text(json.dumps({"threshold": spec.options.get("threshold"), "labels": per},
                                                      indent=2))
    paths = [str(out / "per_label_f1.json")]
    text = "  per-label F1           " + ", ".join(f"{n} {v['f1']:.3f}" for n, v in per.items())
    weights = weights_of(spec)
    if weights:
        (out / "class_weights.json").write_text(json.dumps({"pos_weight": weights}, indent=2))
        paths.append(str(out / "class_weights.json"))
        text += "\n  pos_weight             " + ", ".join(f"{k} {v:.3g}" for k, v in weights.items())
    return paths, text


def align_eval(model, spec):
    """A registry model's label columns in this run's order (by name)."""
    names = spec.label_names or []
    label2id = {str(k): int(v) for k, v in (model.config.label2id or {}).items()}
    if not all(n in label2id for n in names) or model.config.num_labels != len(names):
        raise ValueError(f"model labels {sorted(label2id)} do not match the eval labels {names}")
    order = [label2id[n] for n in names]  # data column i -> model column order[i]
    if order == list(range(len(names))):
        return None
    import torch

    inverse = torch.tensor([names.index(n) for n, _ in sorted(label2id.items(), key=lambda kv: kv[1])])
    return lambda batch: {**batch, "labels": batch["labels"][:, inverse]}


# --- prediction and serving -----------------------------------------------------------------------------------

def predict(model_uri: str, texts: list[str], top_k: int = 5, meta: dict | None = None) -> list[dict]:
    """Every label whose score is above the model's threshold (as `finetune score`), highest first:
    [{text, labels: [{label, score}], threshold}]. pyfunc (and `mlflow models serve`) return every label's score;
    the threshold comes from the logged model's metadata."""
    threshold = float((meta or {}).get("threshold", DEFAULT_THRESHOLD))
    rows = pyfunc_rows(model_uri, texts, meta or {})
    out = []
    for t, row in zip(texts, rows):
        cells = [c for c in row.tolist() if isinstance(c, dict)]
        above = sorted(({"label": str(c["label"]), "score": float(c["score"])} for c in cells
                        if float(c["score"]) > threshold), key=lambda c: -c["score"])
        out.append({"text": t, "labels": above, "threshold": threshold})
    return out


def check_prediction(out: list) -> str | None:
    if not out or not isinstance(out[0].get("labels"), list) or not all(
            0.0 <= c["score"] <= 1.0 and c["label"] for c in out[0]["labels"]):
        return f"malformed multi-label answer {out!r}"
    return None


def serving(config: dict) -> dict:
    """pyfunc returns every label's sigmoid score (`top_k: None`); the metadata records the threshold."""
    return {"model_config": {"top_k": None},
            "metadata": {"problem": "multi_label",
                         "threshold": float(config.get("finetune_threshold", DEFAULT_THRESHOLD))}}
