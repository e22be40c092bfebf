"""Prediction from the Model Registry: `models:/NAME@ALIAS` or `models:/NAME/VERSION`, loaded in this process.
Text classification returns label + score per text; fill-mask returns the top-k candidates per mask."""
from __future__ import annotations

import re
from typing import Any

from tasks import jobs, registry, tracking
from tasks.common import ConfigError

MASK_PLACEHOLDER = "[MASK]"


def model_task(model_uri: str) -> str:
    """The transformers task recorded in the logged model's MLmodel file."""
    from mlflow.models import get_model_info

    info = get_model_info(model_uri)
    return (info.flavors.get("transformers") or {}).get("task", "")


def to_model_mask(texts: list[str], mask_token: str) -> list[str]:
    """`[MASK]` (and `<mask>`) map to the model's own mask token; a text without one is an error."""
    out, bad = [], []
    for i, t in enumerate(texts):
        m = re.sub(r"\[MASK\]|<mask>", lambda _: mask_token, t)
        if mask_token not in m:
            bad.append(i)
        out.append(m)
    if bad:
        raise ConfigError(
            f"text(s) {bad} have no mask: put {MASK_PLACEHOLDER} where the word to predict goes, "
            f'e.g. "This is a {MASK_PLACEHOLDER} movie!"'
        )
    return out


def fill_mask(pipe, texts: list[str], top_k: int = 5) -> list[dict]:
    """Top-k candidates per mask from a fill-mask pipeline: [{text, masks: [[{token_str, score, sequence}]]}],
    each mask's candidates sorted by score."""
    results = []
    for text, masked in zip(texts, to_model_mask(texts, pipe.tokenizer.mask_token)):
        r = pipe(masked, top_k=top_k)
        per_mask = r if (r and isinstance(r[0], list)) else [r]  # one list per mask when there are several
        results.append({"text": text, "masks": [
            [{"token_str": c["token_str"].strip(), "score": float(c["score"]), "sequence": c["sequence"]}
             for c in sorted(cands, key=lambda x: -x["score"])]
            for cands in per_mask
        ]})
    return results


def predict_fill_mask(model_uri: str, texts: list[str], top_k: int = 5) -> list[dict]:
    """Fill-mask models load as their pipeline (pyfunc returns only the top token)."""
    import mlflow

    to_model_mask(texts, MASK_PLACEHOLDER)  # a text without a mask fails here, before the model loads
    return fill_mask(mlflow.transformers.load_model(model_uri), texts, top_k)


def predict_classification(model_uri: str, texts: list[str], top_k: int = 5) -> list[dict]:
    """Classifiers through pyfunc, as `mlflow models serve` answers: label name and score per text."""
    import mlflow

    df = mlflow.pyfunc.load_model(model_uri).predict(texts)
    return [{"text": t, "label": str(row["label"]), "score": float(row["score"])} for t, (_, row) in zip(texts, df.iterrows())]


def _job_of(model_uri: str) -> str | None:
    """The job recorded on a registered version (tag `job`), for `models:/NAME@ALIAS` and `models:/NAME/VERSION`."""
    m = re.fullmatch(r"models:/([^/@]+)(?:@(.+)|/(\d+))", model_uri)
    if not m:
        return None
    name, alias, version = m.groups()
    version = version or registry.alias_version(name, alias)
    mv = registry.get_version(name, version) if version else None
    return (mv.tags or {}).get("job") if mv else None


def predict(model_uri: str, texts: list[str], top_k: int = 5) -> list[Any]:
    """Classification: [{text, label, score}]. Fill-mask: [{text, masks: [[{token_str, score, sequence}]...]}].
    The job that registered the model (or, failing that, its transformers task) decides how it predicts."""
    if not texts:
        raise ConfigError("no texts to predict: pass them as arguments or with --file")
    tracking.configure()
    m = re.fullmatch(r"models:/([^/@]+)(?:@.+|/\d+)", model_uri)
    access = (tracking.on_model(m.group(1), "READ") if m
              else tracking.requires("READ", model_uri))
    with access:
        return _predict(model_uri, texts, top_k)


def _predict(model_uri: str, texts: list[str], top_k: int) -> list[Any]:
    try:
        task = model_task(model_uri)
    except Exception as e:
        if tracking.auth_status(e):
            raise
        raise ConfigError(
            f"could not find {model_uri} in the registry at {tracking.display_uri()}: "
            f"{tracking.redact_uri(str(e).splitlines()[0])}. "
            "Check the model name, alias or version (finetune compare lists them) and MLFLOW_TRACKING_URI."
        ) from None
    job = _job_of(model_uri)
    recipe = jobs.all_jobs().get(job) if job else None
    recipe = recipe or jobs.for_hf_task(task)
    if recipe is None or recipe.predict is None:
        raise ConfigError(f"{model_uri} is a {task or 'non-transformers'} model, which no registered job predicts")
    return recipe.predict(model_uri, texts, top_k)


def format_predictions(results: list[dict]) -> str:
    lines = []
    for r in results:
        if "labels" in r:  # multi-label: every label above the threshold
            labels = (", ".join(f"{c['label']} {c['score']:.4f}" for c in r["labels"])
                      or f"(none above {r['threshold']:g})")
            lines.append(f"{labels}\t{r['text']}")
        elif "value" in r:  # regression: the number
            lines.append(f"{r['value']:.4f}\t{r['text']}")
        elif "label" in r:
            lines.append(f"{r['label']}\t{r['score']:.4f}\t{r['text']}")
        else:
            lines.append(r["text"])
            for i, cands in enumerate(r["masks"]):
                prefix = f"  mask {i + 1}: " if len(r["masks"]) > 1 else "  "
                for rank, c in enumerate(cands, 1):
                    lines.append(f"{prefix}{rank}. {c['token_str']:<15} {c['score']:.4f}  {c['sequence']}")
    return "\n".join(lines)
