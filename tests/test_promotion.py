"""Champion/challenger: the decision rule (pure), metric names, and the alias moves and tags it leads to in a real
(sqlite) registry, with evaluation swapped out or run on tiny logged models."""
from __future__ import annotations

import math

import pytest

from flows.config import ClassifyConfig, ConfigError, MLMConfig
from flows.promotion import decide, resolve_metric


# --- the rule ------------------------------------------------------------------------------------------------


def test_better_challenger_is_promoted():
    d = decide("f1", 0.82, 0.80, margin=0.0)
    assert d.promoted and d.improvement == pytest.approx(0.02)


def test_worse_challenger_is_not_promoted():
    d = decide("accuracy", 0.70, 0.80, margin=0.0)
    assert not d.promoted and "champion stays" in d.reason


def test_tie_is_not_promoted():
    d = decide("f1", 0.8, 0.8, margin=0.0)
    assert not d.promoted and d.reason.startswith("tie")


def test_margin_must_be_exceeded():
    assert not decide("accuracy", 0.81, 0.80, margin=0.02).promoted
    assert not decide("accuracy", 0.82, 0.80, margin=0.02).promoted  # equal to the margin is not "more than"
    assert decide("accuracy", 0.83, 0.80, margin=0.02).promoted


@pytest.mark.parametrize("metric", ["loss", "perplexity"])
def test_lower_is_better_metrics(metric):
    assert decide(metric, 0.40, 0.50).promoted
    assert not decide(metric, 0.60, 0.50).promoted
    assert not decide(metric, 0.45, 0.50, margin=0.1).promoted


def test_missing_champion_promotes_a_healthy_challenger():
    d = decide("f1", 0.5, None, has_champion=False)
    assert d.promoted and "no champion" in d.reason


@pytest.mark.parametrize("score,error", [(None, "OSError: artifact missing"), (float("nan"), None),
                                         (0.9, "smoke prediction failed: ValueError")])
def test_failed_challenger_is_never_promoted(score, error):
    assert not decide("f1", score, 0.1, challenger_error=error).promoted
    assert not decide("f1", score, None, has_champion=False, challenger_error=error).promoted


def test_champion_that_cannot_be_evaluated_blocks_automatic_promotion():
    d = decide("f1", 0.9, None, champion_error="RuntimeError: cannot load")
    assert not d.promoted and "finetune promote" in d.reason


def test_metric_names_defaults_and_synonyms():
    assert resolve_metric(ClassifyConfig()) == "f1"
    assert resolve_metric(MLMConfig()) == "perplexity"
    assert resolve_metric("classify", "macro-F1") == "f1"
    assert resolve_metric("classify", "eval_loss") == "loss"
    assert resolve_metric("mlm", "eval_perplexity") == "perplexity"
    assert resolve_metric(ClassifyConfig(tracking={"promotion_metric": "accuracy"})) == "accuracy"
    with pytest.raises(ConfigError, match="perplexity"):
        resolve_metric("classify", "perplexity")
    with pytest.raises(ConfigError, match="one of"):
        resolve_metric("mlm", "f1")
    with pytest.raises(ConfigError):
        resolve_metric("classify", "bleu")


# --- in a registry ---------------------------------------------------------------------------------------------


@pytest.fixture
def store(isolated, monkeypatch):
    """`isolated`, with the registry pinned too: mlflow.set_registry_uri() exports MLFLOW_REGISTRY_URI, which
    would otherwise keep pointing at the first test's database."""
    import os

    monkeypatch.setenv("MLFLOW_REGISTRY_URI", os.environ["MLFLOW_TRACKING_URI"])
    return isolated


@pytest.fixture
def fake_versions(store):
    """A registered model whose versions point at dummy sources (nothing is loaded: evaluation is swapped out)."""
    from tasks import registry, tracking

    name = "cc-test"

    def add() -> str:
        run_id = tracking.start_run("cc", "r", {"job": "classify"})
        return registry.register_model(f"runs:/{run_id}/model", name, run_id)

    return name, add


def _patch_scores(monkeypatch, scores: dict[str, float | Exception], smoke: dict[str, str | None] | None = None):
    import flows.promotion as p

    def fake_eval(uri, cfg, data_path, tokenized_path):
        s = scores[uri.rsplit("/", 1)[-1]]
        if isinstance(s, Exception):
            return None, f"{type(s).__name__}: {s}"
        return {"f1": s, "accuracy": s, "loss": 1 - s}, None

    monkeypatch.setattr(p, "_evaluate", fake_eval)
    monkeypatch.setattr(p, "smoke_test", lambda uri, job: (smoke or {}).get(uri.rsplit("/", 1)[-1]))


def test_champion_moves_only_when_the_challenger_wins(fake_versions, monkeypatch):
    from flows.promotion import champion_challenger
    from tasks import registry

    name, add = fake_versions
    cfg = ClassifyConfig(tracking={"promotion_margin": 0.05})
    _patch_scores(monkeypatch, {"1": 0.60, "2": 0.63, "3": 0.70})

    v1 = add()
    r1 = champion_challenger(cfg, name, v1, data_path="unused")
    assert r1["promoted"] and registry.alias_version(name, "champion") == "1"

    v2 = add()
    registry.set_alias(name, "challenger", v2)
    r2 = champion_challenger(cfg, name, v2, data_path="unused")
    assert not r2["promoted"] and registry.alias_version(name, "champion") == "1"
    assert registry.alias_version(name, "challenger") == "2"
    tags = registry.get_version(name, "2").tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.metric"] == "f1"
    assert float(tags["promotion.challenger_score"]) == pytest.approx(0.63)
    assert float(tags["promotion.champion_score"]) == pytest.approx(0.60)
    assert tags["promotion.champion_version"] == "1"

    v3 = add()
    registry.set_alias(name, "challenger", v3)
    r3 = champion_challenger(cfg, name, v3, data_path="unused")
    assert r3["promoted"] and r3["champion_score"] == pytest.approx(0.60) and r3["challenger_score"] == pytest.approx(0.70)
    assert registry.aliases(name) == {"champion": "3", "previous-champion": "1"}  # the winner no longer `challenger`
    assert registry.get_version(name, "3").tags["promotion.decision"] == "promoted"
    assert registry.get_version(name, "3").tags[registry.REPLACED_TAG] == "1"


@pytest.mark.parametrize("failure", ["evaluation", "smoke"])
def test_failed_challenger_keeps_the_champion(fake_versions, monkeypatch, failure):
    from flows.promotion import champion_challenger
    from tasks import registry

    name, add = fake_versions
    v1, v2 = add(), add()
    registry.set_alias(name, "champion", v1)
    registry.set_alias(name, "challenger", v2)
    if failure == "evaluation":
        _patch_scores(monkeypatch, {"1": 0.5, "2": OSError("weights missing")})
    else:
        _patch_scores(monkeypatch, {"1": 0.5, "2": 0.99}, smoke={"2": "KeyError: 'label'"})
    r = champion_challenger(ClassifyConfig(), name, v2, data_path="unused")
    assert not r["promoted"] and registry.alias_version(name, "champion") == "1"
    assert r["challenger_error"] and registry.get_version(name, "2").tags["promotion.decision"] == "rejected"


def test_first_version_that_fails_smoke_is_not_champion(fake_versions, monkeypatch):
    from flows.promotion import champion_challenger
    from tasks import registry

    name, add = fake_versions
    _patch_scores(monkeypatch, {"1": 0.9}, smoke={"1": "RuntimeError: boom"})
    r = champion_challenger(ClassifyConfig(), name, add(), data_path="unused")
    assert not r["promoted"] and registry.alias_version(name, "champion") is None


# --- evaluation of real (tiny) registry models -------------------------------------------------------------------


@pytest.fixture
def tiny_registered(store, tiny_model_dir, sentiment_csv):
    """A tiny classifier and a tiny fill-mask model logged and registered in the isolated store, plus a prepared
    dataset (eval split) for each job."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from flows.config import DataConfig
    from tasks import registry, tracking
    from tasks.data import prepare_dataset

    clf_dir = store / "clf"
    m = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    m.save_pretrained(clf_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(clf_dir)
    out = {}
    for key, path, task in (("clf", str(clf_dir), "text-classification"), ("mlm", tiny_model_dir, "fill-mask")):
        run_id = tracking.start_run("tiny", key, {"job": key})
        uri = tracking.log_model(run_id, path, task)
        out[key] = registry.model_uri(f"tiny-{key}", version=registry.register_model(uri, f"tiny-{key}", run_id))
    clf_data = prepare_dataset(DataConfig(dataset=sentiment_csv, text_column="review", label_column="sentiment"), 0)
    mlm_data = prepare_dataset(DataConfig(dataset=sentiment_csv, text_column="review", label_column=None), 0)
    return out, clf_data.path, mlm_data.path


@pytest.mark.slow
def test_evaluate_registered_models(tiny_registered):
    from flows.promotion import evaluate_registered, smoke_test

    uris, clf_data, mlm_data = tiny_registered
    # no tokenized split given: the eval texts are tokenized (and, for MLM, masked once) with the model's tokenizer
    clf_cfg = ClassifyConfig(data={"max_length": 32})
    clf = evaluate_registered(uris["clf"], clf_cfg, clf_data)
    assert set(clf) == {"loss", "accuracy", "f1"} and 0 <= clf["accuracy"] <= 1
    assert clf["loss"] == pytest.approx(math.log(2), abs=0.1)  # an untrained 2-class head: near chance
    mlm_cfg = MLMConfig(data={"max_length": 32})
    mlm = evaluate_registered(uris["mlm"], mlm_cfg, mlm_data)
    assert mlm["perplexity"] == pytest.approx(math.exp(mlm["loss"])) and mlm["perplexity"] > 100  # random weights
    assert evaluate_registered(uris["mlm"], mlm_cfg, mlm_data) == mlm  # masks fixed once: same score twice
    assert smoke_test(uris["clf"], "classify") is None
    assert smoke_test(uris["mlm"], "mlm") is None
    assert smoke_test("models:/no-such-model/1", "classify")


def test_register_and_promote_aliases(fake_versions, monkeypatch):
    """The lifecycle task body: every version arrives as challenger; --no-promote leaves it there, even the first."""
    from flows.lifecycle import register_and_promote
    from tasks import registry, tracking

    name, _ = fake_versions
    _patch_scores(monkeypatch, {"1": 0.5, "2": 0.7})

    def register(promote: bool) -> dict:
        cfg = ClassifyConfig(tracking={"registered_model": name, "promote": promote})
        run_id = tracking.start_run("cc", "r", {"job": "classify"})
        return register_and_promote.fn(cfg, run_id, f"runs:/{run_id}/model", {}, data_path="unused")

    out = register(promote=False)
    assert out["version"] == "1" and out["aliases"] == ["challenger"] and "--no-promote" in out["decision"]
    assert registry.alias_version(name, "champion") is None
    out = register(promote=True)
    assert out["version"] == "2" and out["aliases"] == ["champion"] and out["promoted"]
    assert out["promotion"]["champion_version"] is None  # v1 never was champion
