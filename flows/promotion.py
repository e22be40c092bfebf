"""Champion/challenger promotion. A retrained version arrives as alias `challenger`; the current `champion` and the
challenger are evaluated from the registry on the same eval split, by the job's own evaluation (the function its
training ran each epoch, on the same batches and masks), and `champion` moves only when the challenger wins by more
than the margin. A challenger that fails evaluation or a smoke prediction is never promoted. The decision and both
scores go onto the challenger version as tags and into a Prefect artifact.

The quality floor: no version becomes champion, not even the first, unless it beats the job's trivial baseline on
the same eval data by the promotion metric (its recipe's `baseline` hook): for classification the majority class
(accuracy, macro-F1) and the eval label frequencies (loss), for MLM the model before fine-tuning (the run's
epoch-0 evaluation). A tie does not beat it. `finetune promote` (a person decided) is not subject to it.

The metrics a job allows, their direction and its default come from its recipe (`Recipe.promotion`): classify
allows accuracy, f1 (default: macro-F1 does not reward predicting the majority class on skewed data) and loss; mlm
allows perplexity (default), loss and accuracy (masked tokens)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flows.config import ConfigError, JobConfig
from tasks import jobs

SYNONYMS = jobs.SYNONYMS  # re-exported
TIE_TOLERANCE = 1e-9


def resolve_metric(job: str | JobConfig, metric: str | None = None) -> str:
    """Canonical metric name for a job (default per job); an unknown or unfitting name is a ConfigError."""
    options = None
    if isinstance(job, JobConfig):
        job, metric, options = job.job, job.tracking.promotion_metric if metric is None else metric, job.spec().options
    return jobs.resolve_metric(job, metric, options)


def higher_is_better(job: str, metric: str) -> bool:
    return jobs.get(job).promotion.metrics[metric][1]


def error_line(e: BaseException) -> str:
    """`Type: first line of the message`: how a failed evaluation, smoke test or trial is recorded."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


@dataclass
class Decision:
    promoted: bool
    reason: str
    improvement: float | None = None


def _bad(x: float | None) -> bool:
    return x is None or not math.isfinite(x)


def _pair(a: float, b: float) -> tuple[str, str]:
    """Two scores with 4 decimals, or as many more as it takes to tell them apart (0.69308 vs 0.69315)."""
    for d in range(4, 10):
        x, y = f"{a:.{d}f}", f"{b:.{d}f}"
        if x != y:
            return x, y
    return f"{a:.4f}", f"{b:.4f}"


def decide(
    metric: str,
    challenger: float | None,
    champion: float | None,
    margin: float = 0.0,
    *,
    higher_is_better: bool | None = None,
    has_champion: bool = True,
    challenger_error: str | None = None,
    champion_error: str | None = None,
    baseline: float | None = None,
    baseline_name: str = "trivial",
    baseline_error: str | None = None,
) -> Decision:
    """The promotion rule, a pure function. The challenger must evaluate (and pass its smoke prediction), beat the
    trivial `baseline` on the same eval data (the quality floor: checked even without a champion; a tie does not
    beat it; no margin), and beat the champion by more than `margin` in the metric's direction; a tie never
    promotes. Without a champion, a healthy challenger above the floor is promoted. When the champion or the
    baseline cannot be evaluated nothing moves automatically: the comparison did not happen, so a person decides
    (`finetune promote`). `baseline=None` (and no error): the job has no floor for this metric."""
    if challenger_error or _bad(challenger):
        return Decision(False, f"challenger failed evaluation: {challenger_error or f'{metric} is {challenger}'}")
    up = higher_is_better if higher_is_better is not None else metric in ("accuracy", "f1")
    better = "higher" if up else "lower"
    if baseline_error or (baseline is not None and math.isnan(baseline)):
        why = baseline_error or f"{metric} is {baseline}"
        return Decision(False, f"the {baseline_name} baseline could not be computed ({why}): not promoting "
                               "automatically; check the run and use `finetune promote` if the challenger should win")
    floor = ""
    if baseline is not None:
        over = (challenger - baseline) if up else (baseline - challenger)
        c, b = _pair(challenger, baseline)
        if not over > TIE_TOLERANCE:
            return Decision(False, f"does not beat the {baseline_name} baseline: {metric} {c} vs baseline {b} "
                                   f"({better} is better)")
        floor = f"; beats the {baseline_name} baseline {b}"
    if not has_champion:
        return Decision(True, f"no champion yet: challenger {metric}={c if baseline is not None else f'{challenger:.4f}'}"
                              f"{floor}")
    if champion_error or _bad(champion):
        why = champion_error or f"{metric} is {champion}"
        return Decision(False, f"champion could not be evaluated ({why}): not promoting automatically; "
                               "check it and use `finetune promote` if the challenger should win")
    improvement = (challenger - champion) if up else (champion - challenger)
    cmp = f"{metric} {challenger:.4f} vs champion {champion:.4f} ({better} is better, margin {margin:g})"
    if improvement > margin + TIE_TOLERANCE:
        return Decision(True, f"challenger wins: {cmp}{floor}", improvement)
    if abs(improvement) <= TIE_TOLERANCE:
        return Decision(False, f"tie: {cmp}", improvement)
    if improvement > 0:
        return Decision(False, f"challenger better but not by more than the margin: {cmp}", improvement)
    return Decision(False, f"champion stays: {cmp}", improvement)


# --- evaluation of registry models ---------------------------------------------------------------------------


def evaluate_registered(model_uri: str, cfg: JobConfig, data_path: str, tokenized_path: str | None = None) -> dict[str, float]:
    """Scores of a registry model (`models:/NAME/VERSION`) by its job's evaluation on the eval split, by canonical
    metric name (see `tasks.evaluate.evaluate_registered`)."""
    from tasks.evaluate import evaluate_registered as evaluate

    spec = cfg.spec(_label_names(data_path))
    r = evaluate(model_uri, spec, data_path, tokenized_path)
    return {name: r[key] for name, (key, _) in cfg.recipe.promotion.metrics.items() if key in r}


def _label_names(data_path: str) -> list[str] | None:
    import json
    from pathlib import Path

    f = Path(data_path) / "prepared.json"
    return json.loads(f.read_text()).get("label_names") if f.exists() else None


def smoke_test(model_uri: str, job: str) -> str | None:
    """One prediction of the job's example through the path `finetune predict` uses; returns an error message, or
    None when the answer is well formed."""
    from tasks.predict import predict

    recipe = jobs.get(job)
    try:
        return recipe.check_prediction(predict(model_uri, [recipe.smoke_example], top_k=3))
    except Exception as e:
        return error_line(e)


def eval_data_for_version(name: str, version: str) -> tuple[JobConfig, str, str]:
    """Rebuilds (from the content-addressed cache, or afresh) the prepared and tokenized data of the run that
    produced `version`, from its logged params: the eval split the challenger was measured on."""
    from flows.config import config_from_params
    from tasks import registry, tracking
    from tasks.data import prepare_dataset

    mv = registry.get_version(name, version)
    if mv is None or not mv.run_id:
        raise LookupError(f"{name} version {version} has no source run to take the eval data from")
    cfg = config_from_params(tracking.client().get_run(mv.run_id).data.params)
    data = prepare_dataset(cfg.data, cfg.train.seed, getattr(cfg, "num_labels", None), getattr(cfg, "problem", None))
    spec = cfg.spec(data.label_names)
    return cfg, data.path, cfg.recipe.tokenize(data.path, cfg.train.model, spec)


def _evaluate(uri: str, cfg: JobConfig, data_path: str, tokenized_path: str | None) -> tuple[dict | None, str | None]:
    try:
        return evaluate_registered(uri, cfg, data_path, tokenized_path), None
    except Exception as e:
        return None, error_line(e)


def version_history(name: str, version: str, keys: tuple[str, ...]) -> list[dict]:
    """The per-epoch metrics (`step` = epoch) of the run that produced `version`, as the training history."""
    from tasks import registry, tracking

    mv = registry.get_version(name, version)
    if mv is None or not mv.run_id:
        raise LookupError(f"{name} version {version} has no source run to take its history from")
    rows: dict[int, dict] = {}
    for key in keys:
        for m in tracking.client().get_metric_history(mv.run_id, key):
            rows.setdefault(int(m.step), {"epoch": int(m.step)})[key] = m.value
    return [rows[k] for k in sorted(rows)]


def baseline_scores(cfg: JobConfig, name: str, version: str, data_path: str,
                    history: list[dict] | None) -> tuple[dict | None, str | None]:
    """The job's trivial baseline on the same eval data (its recipe's `baseline` hook), by canonical metric name,
    or an error message. (None, None) when the job has no baseline. Without the run's history (a caller outside
    the training flow) it is read back from the version's run."""
    recipe = cfg.recipe
    if recipe.baseline is None:
        return None, None
    try:
        if history is None:
            history = version_history(name, version, ("train_loss", *recipe.metrics))
        return recipe.baseline(data_path, list(history), cfg.spec(_label_names(data_path))), None
    except Exception as e:
        return None, error_line(e)


def eval_fingerprint(cfg: JobConfig, tokenized_path: str) -> str:
    """Names an eval set as scored: the content-addressed tokenized data (eval split, fixed MLM masks), the eval batch
    size and the precision. Equal fingerprints give equal scores for a given model version."""
    from pathlib import Path

    from tasks.common import stable_hash

    from tasks.device import amp_dtype, select_device

    t = cfg.train
    device = select_device(t.device)  # as resolved here: `auto` means bf16 on one CPU and fp32 on another
    return stable_hash(Path(tokenized_path).name, t.eval_batch_size, device.type, str(amp_dtype(device, t.precision)))[:12]


SCORES_TAG = "eval.scores"  # {fingerprint: {metric: score}}: the version's scores per eval set, one JSON tag
MAX_CACHED_EVAL_SETS = 20


def _cached(tags: dict) -> dict[str, dict[str, float]]:
    import json

    try:
        got = json.loads(tags.get(SCORES_TAG) or "{}")
    except ValueError:
        got = {}
    return got if isinstance(got, dict) else {}


def stored_scores(name: str, version: str, fingerprint: str) -> dict[str, float] | None:
    """A version's scores on the eval set `fingerprint`, recorded on it when they were first computed: the JSON tag
    `eval.scores`, or the per-score tags `eval.<fingerprint>.<metric>` versions registered before it carry."""
    from tasks import registry

    mv = registry.get_version(name, version)
    tags = (mv.tags or {}) if mv else {}
    got = _cached(tags).get(fingerprint)
    if got:
        return {k: float(v) for k, v in got.items()}
    prefix = f"eval.{fingerprint}."
    got = {k[len(prefix):]: float(v) for k, v in tags.items() if k.startswith(prefix)}
    return got or None


def store_scores(name: str, version: str, fingerprint: str, scores: dict[str, float] | None) -> None:
    """Records scores on the version (one JSON tag, `eval.scores`, full precision, the newest
    MAX_CACHED_EVAL_SETS eval sets): a champion is scored once per eval set, not once per retraining."""
    import json

    from tasks import registry

    if not scores:
        return
    mv = registry.get_version(name, version)
    cache = _cached((mv.tags or {}) if mv else {})
    cache.pop(fingerprint, None)
    cache[fingerprint] = {k: float(v) for k, v in scores.items()}
    while len(cache) > MAX_CACHED_EVAL_SETS:
        cache.pop(next(iter(cache)))
    registry.set_version_tags(name, version, {SCORES_TAG: json.dumps(cache, separators=(",", ":"))})


def run_scores(cfg: JobConfig, row: dict) -> dict[str, float]:
    """A run's metrics row by canonical promotion metric name."""
    return {name: float(row[key]) for name, (key, _) in cfg.recipe.promotion.metrics.items() if key in row}


def _check_logged(uri: str, cfg: JobConfig, data_path: str, tokenized_path: str, probe: dict) -> str | None:
    from tasks.evaluate import check_registered

    try:
        return check_registered(uri, cfg.spec(_label_names(data_path)), data_path, tokenized_path, probe)
    except Exception as e:
        return error_line(e)


def champion_challenger(cfg: JobConfig, name: str, version: str, data_path: str | None = None,
                        tokenized_path: str | None = None, run_final: dict | None = None,
                        run_history: list[dict] | None = None, probe: dict[str, float] | None = None,
                        promote: bool = True) -> dict:
    """Evaluates challenger `version` of `name` on the eval split of `data_path` / `tokenized_path` (the run's
    prepared and tokenized data; default: rebuilt from the challenger run's params) against the job's trivial
    baseline on the same data (from `run_history`, the run's per-epoch metrics, where the job needs it): the
    quality floor. A version that does not beat it (or whose metrics are not finite, or that fails its smoke
    prediction) gets no alias: `challenger` stays on the last candidate that did, and the version is tagged with
    the reason. One that does becomes `challenger`, is compared with the current champion (unless `promote` is
    False) and takes `champion` when it wins. The outcome goes to version tags and a Prefect artifact. Returns
    promoted, qualified (got an alias), decision and the scores.

    Nothing is evaluated twice: from the training flow (`run_final` and `probe` given, on the run's own data) the
    challenger's scores are its run's final metrics, and the registered model is only checked against the trained
    one on the probe batch; a champion's scores on an eval set are recorded on its version and reused."""
    from tasks import registry
    from tasks.common import run_logger

    log = run_logger(__name__)
    version = str(version)
    metric = resolve_metric(cfg)
    margin = cfg.tracking.promotion_margin
    champion = registry.alias_version(name, registry.CHAMPION)
    if champion == version:
        return {"promoted": False, "qualified": True, "decision": f"version {version} already is the champion",
                "metric": metric}
    if data_path is None:
        _, data_path, tokenized_path = eval_data_for_version(name, version)

    log.info("champion/challenger on %s: challenger v%s vs champion %s, metric %s, margin %g", name, version,
             f"v{champion}" if champion else "(none)", metric, margin)
    fingerprint = eval_fingerprint(cfg, tokenized_path) if tokenized_path else None
    chall_uri = registry.model_uri(name, version=version)
    if run_final is not None and probe and tokenized_path:
        chall, chall_err = run_scores(cfg, run_final), _check_logged(chall_uri, cfg, data_path, tokenized_path, probe)
    else:
        chall, chall_err = _evaluate(chall_uri, cfg, data_path, tokenized_path)
    if chall_err is None and chall and any(_bad(v) for v in chall.values()):
        chall_err = "non-finite metrics: " + ", ".join(f"{k} {v}" for k, v in chall.items() if _bad(v))
    if fingerprint and chall_err is None:
        store_scores(name, version, fingerprint, chall)
    if chall_err is None:
        smoke_err = smoke_test(registry.model_uri(name, version=version), cfg.job)
        chall_err = f"smoke prediction failed: {smoke_err}" if smoke_err else None
    base, base_err = baseline_scores(cfg, name, version, data_path, run_history)
    baseline_name = jobs.baseline_name_of(cfg.job, cfg.spec().options)
    up = higher_is_better(cfg.job, metric)
    # the floor: healthy, finite and above the trivial baseline (the rule without a champion)
    floor = decide(metric, (chall or {}).get(metric), None, margin, higher_is_better=up, has_champion=False,
                   challenger_error=chall_err, baseline=(base or {}).get(metric), baseline_name=baseline_name,
                   baseline_error=base_err)
    qualified = floor.promoted
    previous_challenger = registry.alias_version(name, registry.CHALLENGER)
    champ, champ_err = (None, None)
    if not qualified:
        d = Decision(False, floor.reason)
        if champion is not None and fingerprint:  # for the record only when already known: no evaluation for it
            champ = stored_scores(name, champion, fingerprint)
    else:
        registry.set_alias(name, registry.CHALLENGER, version)
        if not promote:
            d = Decision(False, "promotion skipped (--no-promote)")
        else:
            if champion is not None:
                champ = stored_scores(name, champion, fingerprint) if fingerprint else None
                if champ is not None and metric in champ:
                    log.info("champion v%s: scores on this eval set recorded on the version", champion)
                else:
                    champ, champ_err = _evaluate(registry.model_uri(name, version=champion), cfg, data_path,
                                                 tokenized_path)
                    if fingerprint and champ_err is None:
                        store_scores(name, champion, fingerprint, champ)
            d = decide(
                metric, (chall or {}).get(metric), (champ or {}).get(metric), margin,
                higher_is_better=up, has_champion=champion is not None,
                challenger_error=chall_err, champion_error=champ_err,
                baseline=(base or {}).get(metric), baseline_name=baseline_name, baseline_error=base_err,
            )
    if d.promoted:
        registry.move_champion(name, version, d.reason)
    if d.promoted:
        decision = (f"version {version} promoted to champion" + (f" (replaces v{champion})" if champion else "")
                    + f": {d.reason}")
    elif qualified:
        decision = (f"version {version} is challenger; champion "
                    + (f"v{champion} unchanged" if champion else "not set") + f": {d.reason}")
    else:
        kept = f"challenger stays v{previous_challenger}" if previous_challenger else "no challenger"
        decision = f"version {version} gets no alias ({kept}): {d.reason}"
    result = {
        "promoted": d.promoted, "qualified": qualified, "decision": decision, "reason": d.reason, "metric": metric,
        "margin": margin, "challenger_version": version, "challenger_score": (chall or {}).get(metric),
        "challenger_scores": chall, "champion_version": champion, "champion_score": (champ or {}).get(metric),
        "champion_scores": champ, "improvement": d.improvement, "challenger_error": chall_err,
        "champion_error": champ_err, "baseline": baseline_name if cfg.recipe.baseline else None,
        "baseline_score": (base or {}).get(metric), "baseline_scores": base, "baseline_error": base_err,
    }
    record(name, result)
    log.info("promotion: %s", decision)
    return result


def record(name: str, result: dict) -> None:
    """Outcome as a few readable tags on the challenger version and as a Prefect artifact: the decision and its
    one-line reason, the metric and the headline scores (empty ones left out), and every score of the comparison
    in one JSON tag, `promotion.scores` (metric -> value per role, and the margin)."""
    import json

    from flows import monitoring
    from tasks import registry

    def fmt(x):
        return "" if x is None else (f"{x:.6g}" if isinstance(x, float) else str(x))

    reason = result["reason"] if result.get("qualified", True) else f"no alias: {result['reason']}"
    tags = {
        "promotion.decision": "promoted" if result["promoted"] else "rejected",
        "promotion.reason": reason[:4000],
        "promotion.metric": result["metric"],
        "promotion.challenger_score": fmt(result["challenger_score"]),
        "promotion.champion_score": fmt(result["champion_score"]),
        "promotion.champion_version": fmt(result["champion_version"]),
        "promotion.baseline": fmt(result.get("baseline")),
        "promotion.baseline_score": fmt(result.get("baseline_score")),
    }
    scores = {role: {k: float(f"{v:.6g}") for k, v in s.items() if isinstance(v, (int, float))}
              for role in ("challenger", "champion", "baseline") if (s := result.get(f"{role}_scores"))}
    if scores:
        tags["promotion.scores"] = json.dumps({**scores, "margin": result["margin"]}, separators=(",", ":"))
    registry.set_version_tags(name, result["challenger_version"], {k: v for k, v in tags.items() if v != ""})
    monitoring.promotion_artifact(name, result)
