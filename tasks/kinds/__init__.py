"""Kinds of text classification, one module each: `single_label` (one class per text, softmax), `multi_label`
(a set of labels per text, sigmoid per label), `regression` (a number per text). transformers' `problem_type` is
the switch: the `classify` recipe (tasks/jobs/classify.py) takes `problem` as an option and hands each of its
hooks to the kind's module, which holds everything that differs: label parsing and validation, the model's head
(num_labels, problem_type), the loss (class weights / pos_weight), the metrics, the quality floor, the promotion
metrics and their direction, prediction (through pyfunc, as `mlflow models serve` answers) and what the logged
model records for serving (MLflow `model_config` and `metadata`).

Sentence pairs work with every kind: `data.text_pair_column` adds a second text column (`text_pair` in the
prepared data), the tokenizer encodes the pair (truncation `longest_first`: the longer text loses tokens first);
predict takes `TEXT ||| TEXT` (on the command line and in `--file` lines); pyfunc takes
`{"text": ..., "text_pair": ...}`, as MLflow's text-classification pyfunc does.

Every kind module provides the same functions (see `single_label` for the signatures):
  encode_labels, check_labels, model_config, init_model, resolve (class weights), loss_for (through
  `weighted_loss`), evaluate (through `tasks.evaluate.eval_loop`), METRICS, PROMOTION, baseline, BASELINE_NAME,
  artifacts, align_eval, predict, check_prediction, serving, EVAL_FP32 (evaluate and score in fp32: regression)."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable

from tasks.common import ConfigError

PROBLEMS = ("single_label", "multi_label", "regression")
# transformers' config.problem_type of each kind (single-label stays unset in the saved config, as before: transformers
# infers it from integer labels)
PROBLEM_TYPES = {"single_label": "single_label_classification", "multi_label": "multi_label_classification",
                 "regression": "regression"}
PAIR_SEPARATOR = "|||"  # predict's convention for a pair of texts: "TEXT ||| TEXT"


def get(problem: str | None) -> ModuleType:
    """The kind module of `problem` (None: single_label)."""
    problem = problem or "single_label"
    if problem not in PROBLEMS:
        raise ConfigError(f"unknown problem {problem!r}: use one of {', '.join(PROBLEMS)}")
    return importlib.import_module(f"tasks.kinds.{problem}")


def of_spec(spec) -> ModuleType:
    """The kind of a JobSpec (its `problem` option; jobs without one are single-label)."""
    return get((spec.options or {}).get("problem"))


def of_model(model) -> ModuleType:
    """The kind of a loaded classifier, from its config's problem_type (a LoRA PeftModel forwards `config`)."""
    pt = getattr(model.config, "problem_type", None)
    return get(next((k for k, v in PROBLEM_TYPES.items() if v == pt), "single_label"))


def of_config_dict(config: dict) -> str:
    pt = config.get("problem_type")
    return next((k for k, v in PROBLEM_TYPES.items() if v == pt), "single_label")


# --- class weights -------------------------------------------------------------------------------------------

def weighted_loss(spec, weights: dict[str, float] | None, fn: Callable):
    """The training loss of a kind with per-label weights (single-label: cross-entropy's class weights,
    multi-label: BCE's pos_weight): `(model, batch, return_outputs=False) -> loss` (and the outputs), which runs
    the model without its labels and returns `fn(logits in fp32, labels, weights)` with the weights as a tensor in
    `spec.label_names` order, on the logits' device; None without weights (the model's own loss). Both engines use
    it: the plain loop as its step loss, the Trainer as `compute_loss`."""
    if not weights:
        return None
    import torch

    w = torch.tensor([weights[n] for n in spec.label_names], dtype=torch.float32)

    def loss(model, batch, return_outputs: bool = False):
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        value = fn(out.logits.float(), batch["labels"], w.to(out.logits.device))
        return (value, out) if return_outputs else value

    return loss


# --- sentence pairs -------------------------------------------------------------------------------------------

def split_pair(text: str) -> dict | str:
    """`"A ||| B"` -> {"text": "A", "text_pair": "B"} (MLflow's text-classification pyfunc input for a pair);
    a text without the separator stays a single text."""
    if PAIR_SEPARATOR not in text:
        return text
    a, b = (s.strip() for s in text.split(PAIR_SEPARATOR, 1))
    if not a or not b:
        raise ConfigError(f"pair {text!r} has an empty side: write it as 'FIRST TEXT {PAIR_SEPARATOR} SECOND TEXT'")
    return {"text": a, "text_pair": b}


def pyfunc_rows(model_uri: str, texts: list[str], meta: dict) -> list:
    """The pyfunc answer for each text, in order (one pandas row each). A pair model (trained with
    `text_pair_column`; metadata `text_pair`) takes {text, text_pair} records, a single text as {text}: its logged
    signature has `text_pair` optional, and the two shapes go in separate calls (MLflow's text-classification
    pyfunc cannot mix them in one batch). A model trained on single texts takes no pairs: its pyfunc would drop
    the second text silently, so a pair is a ConfigError here."""
    import mlflow

    items = [split_pair(t) for t in texts]
    pairs = [i for i, x in enumerate(items) if isinstance(x, dict)]
    model = mlflow.pyfunc.load_model(model_uri)
    if not meta.get("text_pair"):
        if pairs:
            raise ConfigError(f"{model_uri} was trained on single texts, not pairs: drop ' {PAIR_SEPARATOR} ' "
                              "(or train with --text-pair-column)")
        df = model.predict(items)
        return [row for _, row in df.iterrows()]
    out: list = [None] * len(items)
    singles = [i for i in range(len(items)) if i not in set(pairs)]
    for group in (pairs, singles):
        if group:
            df = model.predict([items[i] if isinstance(items[i], dict) else {"text": items[i]} for i in group])
            for i, (_, row) in zip(group, df.iterrows()):
                out[i] = row
    return out


def model_metadata(model_uri: str) -> dict:
    """What the logged model recorded for serving (`serving`): problem, threshold, ... ({} for older models)."""
    from mlflow.models import get_model_info

    try:
        return dict(get_model_info(model_uri).metadata or {})
    except Exception:
        return {}


def serving(model_dir: str) -> dict:
    """The extra `mlflow.transformers.log_model` arguments of a saved classifier (its kind's `serving`, from its
    config.json: multi-label returns every label's score; `metadata` records the problem and threshold);
    {} for anything else (MLM, single-label models)."""
    import json
    from pathlib import Path

    for cfg in (Path(model_dir) / "config.json", Path(model_dir) / "base" / "config.json"):
        if cfg.is_file():
            config = json.loads(cfg.read_text())
            problem = of_config_dict(config)
            out = dict(get(problem).serving(config))
            if config.get("finetune_text_pair"):
                out.update(pair_serving())
                out["metadata"] = {"problem": problem, **out.get("metadata", {}), "text_pair": True}
            return out
    return {}


def pair_serving() -> dict:
    """A pair model's signature: `text` and an optional `text_pair` (without it MLflow infers a single string
    input from the example, and its pyfunc drops the second text of a pair silently)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema  # outputs: as the kind answers (not enforced)

    return {"signature": ModelSignature(
                inputs=Schema([ColSpec("string", "text"), ColSpec("string", "text_pair", required=False)])),
            "input_example": [{"text": "This movie was great!", "text_pair": "I loved every minute of it."}]}
