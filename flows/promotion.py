"""Champion/challenger promotion. A retrained version arrives as alias `challenger`; the current `champion` and the
challenger are evaluated from the registry on the same eval split with the same metric, and `champion` moves only
when the challenger wins by more than the margin. A challenger that fails evaluation or a smoke prediction is never
promoted. The decision and both scores go onto the challenger version as tags and into a Prefect artifact.

Metrics (`--promotion-metric`), with their direction:
    accuracy    higher is better   classify: accuracy; mlm: masked-token accuracy
    f1          higher is better   classify only: macro-F1            (default for classify)
    loss        lower is better    classify: cross-entropy; mlm: masked-LM loss
    perplexity  lower is better    mlm only: exp(masked-LM loss)      (default for mlm)
Macro-F1 is the classify default: it is accuracy on balanced data (IMDB) and does not reward predicting the
majority class on skewed data (Yelp subsets, user CSVs)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flows.config import ConfigError, JobConfig

HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "loss": False, "perplexity": False}
SYNONYMS = {
    "acc": "accuracy", "eval_accuracy": "accuracy", "masked_accuracy": "accuracy", "eval_masked_accuracy": "accuracy",
    "macro-f1": "f1", "macro_f1": "f1", "f1_macro": "f1", "eval_f1": "f1",
    "eval_loss": "loss", "ppl": "perplexity", "eval_perplexity": "perplexity",
}
JOB_METRICS = {"classify": ("f1", ["accuracy", "f1", "loss"]), "mlm": ("perplexity", ["perplexity", "loss", "accuracy"])}
TIE_TOLERANCE = 1e-9


def resolve_metric(job: str | JobConfig, metric: str | None = None) -> str:
    """Canonical metric name for a job (default per job); an unknown or unfitting name is a ConfigError."""
    if isinstance(job, JobConfig):
        job, metric = job.job, job.tracking.promotion_metric if metric is None else metric
    default, allowed = JOB_METRICS.get(job, ("loss", ["loss"]))
    if metric is None:
        return default
    name = SYNONYMS.get(metric.strip().lower(), metric.strip().lower())
    if name not in allowed:
        raise ConfigError(
            f"promotion metric {metric!r} does not apply to {job} models: use one of {', '.join(allowed)} "
            f"(default {default})"
        )
    return name


@dataclass
class Decision:
    promoted: bool
    reason: str
    improvement: float | None = None


def _bad(x: float | None) -> bool:
    return x is None or not math.isfinite(x)


def decide(
    metric: str,
    challenger: float | None,
    champion: float | None,
    margin: float = 0.0,
    *,
    has_champion: bool = True,
    challenger_error: str | None = None,
    champion_error: str | None = None,
) -> Decision:
    """The promotion rule, a pure function. The challenger must evaluate (and pass its smoke prediction) and beat
    the champion by more than `margin` in the metric's direction; a tie never promotes. Without a champion, a
    healthy challenger is promoted. When the champion cannot be evaluated nothing moves automatically: the
    comparison did not happen, so a person decides (`finetune promote`)."""
    if challenger_error or _bad(challenger):
        return Decision(False, f"challenger failed evaluation: {challenger_error or f'{metric} is {challenger}'}")
    if not has_champion:
        return Decision(True, f"no champion yet: challenger {metric}={challenger:.4f}")
    if champion_error or _bad(champion):
        why = champion_error or f"{metric} is {champion}"
        return Decision(False, f"champion could not be evaluated ({why}): not promoting automatically; "
                               "check it and use `finetune promote` if the challenger should win")
    improvement = (challenger - champion) if HIGHER_IS_BETTER[metric] else (champion - challenger)
    better = "higher" if HIGHER_IS_BETTER[metric] else "lower"
    cmp = f"{metric} {challenger:.4f} vs champion {champion:.4f} ({better} is better, margin {margin:g})"
    if improvement > margin + TIE_TOLERANCE:
        return Decision(True, f"challenger wins: {cmp}", improvement)
    if abs(improvement) <= TIE_TOLERANCE:
        return Decision(False, f"tie: {cmp}", improvement)
    if improvement > 0:
        return Decision(False, f"challenger better but not by more than the margin: {cmp}", improvement)
    return Decision(False, f"champion stays: {cmp}", improvement)


# --- evaluation of registry models ---------------------------------------------------------------------------


def _classifier_scores(pipe, eval_ds, max_length: int, batch_size: int) -> dict[str, float]:
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    from tasks.evaluate import evaluate_classifier

    model, tok = pipe.model, pipe.tokenizer
    names = list(eval_ds.features["label"].names)
    label2id = {str(k): int(v) for k, v in (model.config.label2id or {}).items()}
    if all(n in label2id for n in names):  # labels by name: robust to a different label order
        to_model = [label2id[n] for n in names]
    elif model.config.num_labels == len(names):
        to_model = list(range(len(names)))
    else:
        raise ValueError(f"model labels {sorted(label2id)} do not match the eval labels {names}")
    # The model's own tokenizer (champion and challenger may differ), then the training-time evaluation.
    ds = eval_ds.map(
        lambda b: {**tok(b["text"], truncation=True, max_length=max_length), "labels": [to_model[i] for i in b["label"]]},
        batched=True, remove_columns=eval_ds.column_names, keep_in_memory=True,
    )
    ds.set_format("torch")
    loader = DataLoader(ds, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tok))
    r = evaluate_classifier(model, loader, model.device, desc="promotion eval")
    return {k: r[k] for k in ("loss", "accuracy", "f1")}


def _mlm_scores(pipe, eval_ds, max_length: int, batch_size: int, mlm_probability: float, seed: int) -> dict[str, float]:
    """Masked-LM loss, perplexity and masked-token accuracy with seeded masking: both models see the same masks."""
    import torch
    from transformers import DataCollatorForLanguageModeling

    model, tok = pipe.model, pipe.tokenizer
    collator = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=mlm_probability)
    texts = [t for t in eval_ds["text"] if t and t.strip()]
    model.eval()
    loss_sum, n_masked, correct = 0.0, 0, 0
    torch.manual_seed(seed)
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i : i + batch_size], truncation=True, max_length=max_length)
            batch = collator([{k: enc[k][j] for k in enc} for j in range(len(enc["input_ids"]))])
            batch = {k: v.to(model.device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            mask = labels != -100
            if not mask.any():
                continue
            loss_sum += torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum").item()
            correct += (logits[mask].argmax(-1) == labels[mask]).sum().item()
            n_masked += int(mask.sum())
    if n_masked == 0:
        raise ValueError("no token was masked in the eval data: too few or too short texts")
    loss = loss_sum / n_masked
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct / n_masked}


def evaluate_registered(model_uri: str, eval_data: str, max_length: int = 128, batch_size: int = 32,
                        mlm_probability: float = 0.15, seed: int = 0) -> dict[str, float]:
    """Scores of a registry model (`models:/NAME/VERSION`) on the `eval` split of a prepared dataset on disk.
    Classifiers: loss, accuracy, f1. Fill-mask models: loss, perplexity, accuracy (masked tokens)."""
    import mlflow
    from datasets import load_from_disk

    from tasks import tracking

    tracking.configure()
    pipe = mlflow.transformers.load_model(model_uri)
    eval_ds = load_from_disk(eval_data)["eval"]
    if pipe.task == "fill-mask":
        return _mlm_scores(pipe, eval_ds, max_length, batch_size, mlm_probability, seed)
    return _classifier_scores(pipe, eval_ds, max_length, batch_size)


def smoke_test(model_uri: str, job: str) -> str | None:
    """One prediction through the same path `finetune predict` uses (pyfunc for classifiers, the pipeline for
    fill-mask); returns an error message, or None when the answer is well formed."""
    from tasks.predict import predict

    try:
        if job == "mlm":
            out = predict(model_uri, ["This is a [MASK] movie!"], top_k=3)
            cands = out[0]["masks"][0]
            if not cands or not all(math.isfinite(c["score"]) for c in cands):
                return f"malformed fill-mask answer {out!r}"
        else:
            out = predict(model_uri, ["This movie was great!"])
            if not out or not out[0]["label"] or not (0.0 <= out[0]["score"] <= 1.0):
                return f"malformed classification answer {out!r}"
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def eval_data_for_version(cfg: JobConfig, name: str, version: str) -> str:
    """Rebuilds (from the content-addressed cache, or afresh) the prepared dataset of the run that produced
    `version`, from its logged `data.*` params and seed: the eval split the challenger was measured on."""
    import yaml

    from flows.config import DataConfig
    from tasks import registry, tracking
    from tasks.data import prepare_dataset

    mv = registry.get_version(name, version)
    if mv is None or not mv.run_id:
        raise LookupError(f"{name} version {version} has no source run to take the eval data from")
    params = tracking.client().get_run(mv.run_id).data.params

    def val(s: str) -> Any:
        return None if s == "None" else yaml.safe_load(s)

    data = {k.split(".", 1)[1]: val(v) for k, v in params.items() if k.startswith("data.")}
    data_cfg = DataConfig(**{k: v for k, v in data.items() if k in DataConfig.model_fields})
    seed = int(val(params.get("train.seed", str(cfg.train.seed))))
    num_labels = val(params["num_labels"]) if "num_labels" in params else None
    return prepare_dataset(data_cfg, seed, num_labels).path


def _evaluate(uri: str, cfg: JobConfig, eval_data: str) -> tuple[dict | None, str | None]:
    try:
        return evaluate_registered(uri, eval_data, cfg.data.max_length, cfg.train.eval_batch_size,
                                   getattr(cfg, "mlm_probability", 0.15), cfg.train.seed), None
    except Exception as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def champion_challenger(cfg: JobConfig, name: str, version: str, eval_data: str | None = None) -> dict:
    """Evaluates challenger `version` and the current champion of `name` on `eval_data` (a prepared dataset
    dir; default: rebuilt from the challenger run's params), decides, moves `champion` when the challenger wins,
    and records the outcome (version tags, Prefect artifact). Returns promoted, decision and both scores."""
    from tasks import registry
    from tasks.common import run_logger

    log = run_logger(__name__)
    version = str(version)
    metric = resolve_metric(cfg)
    margin = cfg.tracking.promotion_margin
    champion = registry.alias_version(name, registry.CHAMPION)
    if champion == version:
        return {"promoted": False, "decision": f"version {version} already is the champion", "metric": metric}
    if eval_data is None:
        eval_data = eval_data_for_version(cfg, name, version)

    log.info("champion/challenger on %s: challenger v%s vs champion %s, metric %s, margin %g", name, version,
             f"v{champion}" if champion else "(none)", metric, margin)
    chall, chall_err = _evaluate(registry.model_uri(name, version=version), cfg, eval_data)
    if chall_err is None:
        smoke_err = smoke_test(registry.model_uri(name, version=version), cfg.job)
        chall_err = f"smoke prediction failed: {smoke_err}" if smoke_err else None
    champ, champ_err = (None, None)
    if champion is not None and chall_err is None:  # no need to score the champion against a failed challenger
        champ, champ_err = _evaluate(registry.model_uri(name, version=champion), cfg, eval_data)
    d = decide(
        metric, (chall or {}).get(metric), (champ or {}).get(metric), margin,
        has_champion=champion is not None, challenger_error=chall_err, champion_error=champ_err,
    )
    if d.promoted:
        registry.move_champion(name, version, d.reason)
    decision = (f"version {version} promoted to champion" + (f" (replaces v{champion})" if champion else "")
                if d.promoted else f"version {version} stays challenger; champion "
                + (f"v{champion} unchanged" if champion else "not set")) + f": {d.reason}"
    result = {
        "promoted": d.promoted, "decision": decision, "reason": d.reason, "metric": metric, "margin": margin,
        "challenger_version": version, "challenger_score": (chall or {}).get(metric), "challenger_scores": chall,
        "champion_version": champion, "champion_score": (champ or {}).get(metric), "champion_scores": champ,
        "improvement": d.improvement, "challenger_error": chall_err, "champion_error": champ_err,
    }
    record(name, result)
    log.info("promotion: %s", decision)
    return result


def record(name: str, result: dict) -> None:
    """Outcome as tags on the challenger version (scores, metric, margin, decision) and as a Prefect artifact."""
    from flows import monitoring
    from tasks import registry

    def fmt(x):
        return "" if x is None else (f"{x:.6g}" if isinstance(x, float) else str(x))

    tags = {
        "promotion.metric": result["metric"],
        "promotion.margin": fmt(result["margin"]),
        "promotion.challenger_score": fmt(result["challenger_score"]),
        "promotion.champion_score": fmt(result["champion_score"]),
        "promotion.champion_version": fmt(result["champion_version"]),
        "promotion.decision": "promoted" if result["promoted"] else "rejected",
        "promotion.reason": result["reason"][:4000],
    }
    for role in ("challenger", "champion"):
        for k, v in (result.get(f"{role}_scores") or {}).items():
            tags[f"promotion.{role}.{k}"] = fmt(v)
    registry.set_version_tags(name, result["challenger_version"], tags)
    monitoring.promotion_artifact(name, result)
