"""Champion/challenger promotion, as plain functions. A retrained version arrives as alias `challenger`; the current
`champion` and the challenger are scored from the registry on the same eval split, by the job's own evaluation (the
function its training ran each epoch, on the same batches and masks), and `champion` moves only when the challenger
wins by more than the margin. A challenger that fails evaluation or a smoke prediction is never promoted. The
decision and both scores go onto the challenger version as tags (the flow also publishes them as a Prefect
artifact: flows/promotion.py).

The quality floor: no version becomes champion, not even the first, unless it beats the job's trivial baseline on
the same eval data by the promotion metric (its recipe's `baseline` hook): for classification the majority class
(accuracy, macro-F1) and the eval label frequencies (loss), for MLM the model before fine-tuning (the run's
epoch-0 evaluation). A tie does not beat it. `finetune promote` (a person decided) is not subject to it.

The metrics a job allows, their direction and its default come from its recipe (`Recipe.promotion`): classify
allows accuracy, f1 (default: macro-F1 does not reward predicting the majority class on skewed data) and loss; mlm
allows perplexity (default), loss and accuracy (masked tokens).

Parts: the rule (`decide`), scoring a registered version (`evaluate_registered`, `check_registered`,
`smoke_test`), the floor (`baseline_scores`), the score cache (`eval_fingerprint`, `stored_scores`,
`store_scores`), and the whole gate (`champion_challenger`), which takes the job as a `JobSpec` (never a flow's
config)."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tasks import jobs, registry, tracking
from tasks.base_model import resolve_model
from tasks.common import cache_root, run_logger, stable_hash
from tasks.device import amp_dtype, select_device
from tasks.evaluate import probe_scores
from tasks.jobs import JobSpec
from tasks.loaders import build_dataloaders
from tasks.predict import predict

SYNONYMS = jobs.SYNONYMS  # re-exported
TIE_TOLERANCE = 1e-9


def resolve_metric(job: str | JobSpec, metric: str | None = None) -> str:
    """Canonical metric name for a job (default per job); an unknown or unfitting name is a ConfigError. A JobSpec
    brings its own `promotion_metric`."""
    options = None
    if isinstance(job, JobSpec):
        job, metric, options = job.job, job.promotion_metric if metric is None else metric, job.options
    return jobs.resolve_metric(job, metric, options)


def higher_is_better(job: str, metric: str) -> bool:
    return jobs.get(job).promotion.metrics[metric][1]


def error_line(e: BaseException) -> str:
    """`Type: first line of the message`: how a failed evaluation, smoke test or trial is recorded."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


# --- the rule ------------------------------------------------------------------------------------------------


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


# --- scoring a registered version on an eval set ---------------------------------------------------------------


def label_names(data_path: str) -> list[str] | None:
    """The label names of a prepared dataset (None without labels, or when the path holds no prepared data)."""
    f = Path(data_path) / "prepared.json"
    return json.loads(f.read_text()).get("label_names") if f.exists() else None


def _with_labels(spec: JobSpec, data_path: str) -> JobSpec:
    return spec if spec.label_names is not None else spec.model_copy(update={"label_names": label_names(data_path)})


def tokenizer_fingerprint(tok) -> str:
    """Identifies what a tokenizer produces (vocabulary, normalisation, special tokens), not where it lives."""
    backend = getattr(tok, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256((blob + tok.padding_side + type(tok).__name__).encode()).hexdigest()[:16]


class _Mapped:
    """A loader whose batches go through `fn` (e.g. labels renumbered to a model's own label ids)."""

    def __init__(self, loader, fn):
        self.loader, self.fn = loader, fn

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return (self.fn(b) for b in self.loader)


def registered_for_eval(model_uri: str, spec: JobSpec, data_path: str, tokenized_path: str | None):
    """A registry model ready for its job's evaluation: (model, eval loader, device, dtype, tokenized path). When
    the model's tokenizer produces what the run's did, the run's tokenized eval split is used as is (same batches,
    same masks); otherwise the eval texts are tokenized again with the model's tokenizer."""
    # mlflow.transformers and transformers pull in torch: loaded when a model is scored, not when this is imported
    import mlflow.transformers
    from transformers import AutoTokenizer

    recipe = spec.recipe
    tracking.configure()
    pipe = mlflow.transformers.load_model(model_uri)
    model, tok = pipe.model, pipe.tokenizer
    run_tok = AutoTokenizer.from_pretrained(resolve_model(spec.train.model))
    if tokenized_path is None or tokenizer_fingerprint(tok) != tokenizer_fingerprint(run_tok):
        tok_dir = cache_root() / "tokenizers" / tokenizer_fingerprint(tok)  # stable path: a stable cache key
        if not (tok_dir / "config.json").exists():  # the tokenizer, and the config that says what the model takes
            tok.save_pretrained(tok_dir)
            model.config.save_pretrained(tok_dir)
        tokenized_path = recipe.tokenize(data_path, str(tok_dir), spec)
    t = spec.train
    loader = build_dataloaders(tokenized_path, t.model, t.batch_size, t.eval_batch_size, t.seed,
                               collator=recipe.collator(tok, spec))["eval"]
    remap = recipe.align_eval(model, spec) if recipe.align_eval else None
    device = select_device(t.device)
    model.to(device)
    return model, (_Mapped(loader, remap) if remap else loader), device, amp_dtype(device, t.precision), tokenized_path


def evaluate_registered(model_uri: str, spec: JobSpec, data_path: str,
                        tokenized_path: str | None = None) -> dict[str, float]:
    """Scores of a registry model (`models:/NAME/VERSION`) by its job's own evaluation on the eval split of
    `data_path`, by canonical promotion metric name (see `registered_for_eval`): on the run's own tokenized data
    each score equals the run's final metric."""
    spec = _with_labels(spec, data_path)
    model, loader, device, dtype, _ = registered_for_eval(model_uri, spec, data_path, tokenized_path)
    r = spec.recipe.evaluate(model, loader, device, dtype, desc="promotion eval")
    return run_scores(spec, {k: v for k, v in r.items() if isinstance(v, float)})


def check_registered(model_uri: str, spec: JobSpec, data_path: str, tokenized_path: str, expected: dict[str, float],
                     rel_tol: float = 1e-3, abs_tol: float = 1e-5) -> str | None:
    """None when the registry model scores what the trained model scored on the probe batches (`expected`, from
    `tasks.evaluate.probe_scores` at the end of training), else what differs. Same weights give the same numbers up
    to float noise; another epoch's or a corrupted model's differ by far more than 0.1%."""
    spec = _with_labels(spec, data_path)
    model, loader, device, dtype, used = registered_for_eval(model_uri, spec, data_path, tokenized_path)
    if used != tokenized_path:
        return "the registered model's tokenizer differs from the one it was trained with"
    got = probe_scores(model, loader, spec, device, dtype)
    bad = [f"{k} {got.get(k)} vs {v} trained" for k, v in expected.items()
           if not math.isclose(got.get(k, math.nan), v, rel_tol=rel_tol, abs_tol=abs_tol)]
    return ("the registered model does not reproduce the trained one on the probe batch: " + ", ".join(bad)
            if bad else None)


def run_scores(spec: JobSpec, row: dict) -> dict[str, float]:
    """A run's metrics row (logged keys) by canonical promotion metric name."""
    return {name: float(row[key]) for name, (key, _) in spec.recipe.promotion.metrics.items() if key in row}


def smoke_test(model_uri: str, job: str) -> str | None:
    """One prediction of the job's example through the path `finetune predict` uses; returns an error message, or
    None when the answer is well formed."""
    recipe = jobs.get(job)
    try:
        return recipe.check_prediction(predict(model_uri, [recipe.smoke_example], top_k=3))
    except Exception as e:
        return error_line(e)


def _evaluate(uri: str, spec: JobSpec, data_path: str, tokenized_path: str | None) -> tuple[dict | None, str | None]:
    try:
        return evaluate_registered(uri, spec, data_path, tokenized_path), None
    except Exception as e:
        return None, error_line(e)


def _check_logged(uri: str, spec: JobSpec, data_path: str, tokenized_path: str, probe: dict) -> str | None:
    try:
        return check_registered(uri, spec, data_path, tokenized_path, probe)
    except Exception as e:
        return error_line(e)


# --- the quality floor -----------------------------------------------------------------------------------------


def version_history(name: str, version: str, keys: tuple[str, ...]) -> list[dict]:
    """The per-epoch metrics (`step` = epoch) of the run that produced `version`, as the training history."""
    mv = registry.get_version(name, version)
    if mv is None or not mv.run_id:
        raise LookupError(f"{name} version {version} has no source run to take its history from")
    rows: dict[int, dict] = {}
    for key in keys:
        for m in tracking.client().get_metric_history(mv.run_id, key):
            rows.setdefault(int(m.step), {"epoch": int(m.step)})[key] = m.value
    return [rows[k] for k in sorted(rows)]


def baseline_scores(spec: JobSpec, name: str, version: str, data_path: str,
                    history: list[dict] | None) -> tuple[dict | None, str | None]:
    """The job's trivial baseline on the same eval data (its recipe's `baseline` hook), by canonical metric name,
    or an error message. (None, None) when the job has no baseline. Without the run's history (a caller outside
    the training flow) it is read back from the version's run."""
    recipe = spec.recipe
    if recipe.baseline is None:
        return None, None
    try:
        if history is None:
            history = version_history(name, version, ("train_loss", *recipe.metrics))
        return recipe.baseline(data_path, list(history), _with_labels(spec, data_path)), None
    except Exception as e:
        return None, error_line(e)


# --- the stored-score cache --------------------------------------------------------------------------------------


def eval_fingerprint(spec: JobSpec, tokenized_path: str) -> str:
    """Names an eval set as scored: the content-addressed tokenized data (eval split, fixed MLM masks), the eval batch
    size and the precision. Equal fingerprints give equal scores for a given model version."""
    t = spec.train
    device = select_device(t.device)  # as resolved here: `auto` means bf16 on one CPU and fp32 on another
    return stable_hash(Path(tokenized_path).name, t.eval_batch_size, device.type, str(amp_dtype(device, t.precision)))[:12]


SCORES_TAG = "eval.scores"  # {fingerprint: {metric: score}}: the version's scores per eval set, one JSON tag
MAX_CACHED_EVAL_SETS = 20


def _cached(tags: dict) -> dict[str, dict[str, float]]:
    try:
        got = json.loads(tags.get(SCORES_TAG) or "{}")
    except ValueError:
        got = {}
    return got if isinstance(got, dict) else {}


def stored_scores(name: str, version: str, fingerprint: str) -> dict[str, float] | None:
    """A version's scores on the eval set `fingerprint`, recorded on it when they were first computed: the JSON tag
    `eval.scores`, or the per-score tags `eval.<fingerprint>.<metric>` versions registered before it carry."""
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
    if not scores:
        return
    mv = registry.get_version(name, version)
    cache = _cached((mv.tags or {}) if mv else {})
    cache.pop(fingerprint, None)
    cache[fingerprint] = {k: float(v) for k, v in scores.items()}
    while len(cache) > MAX_CACHED_EVAL_SETS:
        cache.pop(next(iter(cache)))
    registry.set_version_tags(name, version, {SCORES_TAG: json.dumps(cache, separators=(",", ":"))})


# --- the gate ----------------------------------------------------------------------------------------------------


def champion_challenger(spec: JobSpec, name: str, version: str, *, margin: float = 0.0, promote: bool = True,
                        data_path: str | None = None, tokenized_path: str | None = None,
                        eval_data: Callable[[], tuple[str, str]] | None = None, run_final: dict | None = None,
                        run_history: list[dict] | None = None, probe: dict[str, float] | None = None) -> dict:
    """Evaluates challenger `version` of `name` on the eval split of `data_path` / `tokenized_path` (the run's
    prepared and tokenized data; without them, `eval_data()` gives them, e.g. rebuilt from the challenger run's
    params) against the job's trivial baseline on the same data (from `run_history`, the run's per-epoch metrics,
    where the job needs it): the quality floor. A version that does not beat it (or whose metrics are not finite,
    or that fails its smoke prediction) gets no alias: `challenger` stays on the last candidate that did, and the
    version is tagged with the reason. One that does becomes `challenger`, is compared with the current champion
    by `spec`'s promotion metric (unless `promote` is False) and takes `champion` when it wins by more than
    `margin`. The outcome goes to version tags (`record_tags`). Returns promoted, qualified (got an alias),
    decision and the scores.

    Nothing is evaluated twice: from the training flow (`run_final` and `probe` given, on the run's own data) the
    challenger's scores are its run's final metrics, and the registered model is only checked against the trained
    one on the probe batch; a champion's scores on an eval set are recorded on its version and reused."""
    log = run_logger(__name__)
    version = str(version)
    metric = resolve_metric(spec)
    champion = registry.alias_version(name, registry.CHAMPION)
    if champion == version:
        return {"promoted": False, "qualified": True, "decision": f"version {version} already is the champion",
                "metric": metric}
    if data_path is None:
        if eval_data is None:
            raise ValueError("champion_challenger needs the eval data: data_path, or eval_data to rebuild it")
        data_path, tokenized_path = eval_data()
    spec = _with_labels(spec, data_path)

    log.info("champion/challenger on %s: challenger v%s vs champion %s, metric %s, margin %g", name, version,
             f"v{champion}" if champion else "(none)", metric, margin)
    fingerprint = eval_fingerprint(spec, tokenized_path) if tokenized_path else None
    chall_uri = registry.model_uri(name, version=version)
    if run_final is not None and probe and tokenized_path:
        chall, chall_err = run_scores(spec, run_final), _check_logged(chall_uri, spec, data_path, tokenized_path, probe)
    else:
        chall, chall_err = _evaluate(chall_uri, spec, data_path, tokenized_path)
    if chall_err is None and chall and any(_bad(v) for v in chall.values()):
        chall_err = "non-finite metrics: " + ", ".join(f"{k} {v}" for k, v in chall.items() if _bad(v))
    if fingerprint and chall_err is None:
        store_scores(name, version, fingerprint, chall)
    if chall_err is None:
        smoke_err = smoke_test(chall_uri, spec.job)
        chall_err = f"smoke prediction failed: {smoke_err}" if smoke_err else None
    base, base_err = baseline_scores(spec, name, version, data_path, run_history)
    baseline_name = jobs.baseline_name_of(spec.job, spec.options)
    up = higher_is_better(spec.job, metric)
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
                    champ, champ_err = _evaluate(registry.model_uri(name, version=champion), spec, data_path,
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
        "champion_error": champ_err, "baseline": baseline_name if spec.recipe.baseline else None,
        "baseline_score": (base or {}).get(metric), "baseline_scores": base, "baseline_error": base_err,
    }
    record_tags(name, result)
    log.info("promotion: %s", decision)
    return result


def record_tags(name: str, result: dict) -> None:
    """The outcome as a few readable tags on the challenger version: the decision and its one-line reason, the
    metric and the headline scores (empty ones left out), and every score of the comparison in one JSON tag,
    `promotion.scores` (metric -> value per role, and the margin)."""
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
