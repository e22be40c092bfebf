"""Champion/challenger: the decision rule (pure), metric names, and the alias moves and tags it leads to in a real
(sqlite) registry, with evaluation swapped out or run on tiny logged models."""
from __future__ import annotations

import json

import math

import pytest

from flows.config import ClassifyConfig, ConfigError, MLMConfig
from tasks.promotion import decide, resolve_metric


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


# --- the quality floor ------------------------------------------------------------------------------------------


def test_first_version_must_beat_the_baseline():
    d = decide("f1", 1 / 3, None, has_champion=False, baseline=1 / 3, baseline_name="majority-class")
    assert not d.promoted
    assert d.reason.startswith("does not beat the majority-class baseline: f1 0.3333 vs baseline 0.3333")
    d = decide("f1", 0.30, None, has_champion=False, baseline=1 / 3, baseline_name="majority-class")
    assert not d.promoted and "does not beat" in d.reason
    d = decide("f1", 0.80, None, has_champion=False, baseline=1 / 3, baseline_name="majority-class")
    assert d.promoted and "no champion" in d.reason and "beats the majority-class baseline 0.3333" in d.reason


def test_baseline_respects_the_direction_and_has_no_margin():
    # lower is better: perplexity must drop below the untrained model's
    assert decide("perplexity", 90.0, None, has_champion=False, baseline=100.0).promoted
    assert not decide("perplexity", 100.0, None, has_champion=False, baseline=100.0).promoted  # a tie
    assert not decide("perplexity", 120.0, None, has_champion=False, baseline=100.0).promoted
    assert decide("perplexity", 90.0, None, has_champion=False, baseline=float("inf")).promoted
    # the margin is for the champion comparison, not the floor
    assert decide("accuracy", 0.51, None, has_champion=False, baseline=0.50, margin=0.2).promoted


def test_a_champion_does_not_lower_the_floor():
    """Beating a (bad) champion is not enough: the challenger must beat the baseline too."""
    d = decide("accuracy", 0.50, 0.40, baseline=0.50, baseline_name="majority-class")
    assert not d.promoted and "does not beat the majority-class baseline: accuracy 0.5000 vs baseline 0.5000" in d.reason
    d = decide("accuracy", 0.70, 0.60, baseline=0.50, baseline_name="majority-class")
    assert d.promoted and "challenger wins" in d.reason and "majority-class baseline 0.5000" in d.reason


def test_baseline_that_cannot_be_computed_blocks_automatic_promotion():
    for kw in ({"baseline_error": "LookupError: no epoch 0"}, {"baseline": float("nan")}):
        d = decide("f1", 0.9, None, has_champion=False, baseline_name="untrained-model (epoch 0)", **kw)
        assert not d.promoted and "untrained-model (epoch 0) baseline could not be computed" in d.reason
        assert "finetune promote" in d.reason


def test_no_baseline_means_no_floor():
    assert decide("coverage", 0.1, None, has_champion=False, baseline=None).promoted


def test_majority_class_baseline(tmp_path):
    """The classification hook: the majority class of the eval split, scored as the model's eval is."""
    import math

    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    from tasks.jobs import JobSpec, get

    names = ["1", "2", "3"]
    feats = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    ev = [0] * 6 + [1] * 3 + [2] * 1  # 60% class "1"
    DatasetDict({
        "train": Dataset.from_dict({"text": ["t"] * 3, "label": [0, 1, 2]}, features=feats),
        "eval": Dataset.from_dict({"text": ["t"] * 10, "label": ev}, features=feats),
    }).save_to_disk(str(tmp_path / "d"))
    b = get("classify").baseline(str(tmp_path / "d"), [], JobSpec(job="classify", label_names=names))
    assert b["accuracy"] == pytest.approx(0.6)
    assert b["f1"] == pytest.approx((2 * 0.6 / 1.6) / 3)  # F1 of class "1" (precision 0.6, recall 1), others 0
    assert b["loss"] == pytest.approx(-(0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1)))
    # exactly what the classifier's evaluation gives a model that always predicts the majority class: a tie
    from tasks.evaluate import classification_metrics

    assert classification_metrics([0] * 10, ev, 3)["f1"] == b["f1"]
    # balanced 2 classes: the numbers of the issue (f1 0.3333, accuracy 0.5, loss ln 2)
    feats2 = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    DatasetDict({"train": Dataset.from_dict({"text": ["t"] * 2, "label": [0, 1]}, features=feats2),
                 "eval": Dataset.from_dict({"text": ["t"] * 4, "label": [0, 1, 0, 1]}, features=feats2)}
                ).save_to_disk(str(tmp_path / "b"))
    b2 = get("classify").baseline(str(tmp_path / "b"), [], JobSpec(job="classify", label_names=["neg", "pos"]))
    assert b2 == pytest.approx({"accuracy": 0.5, "f1": 1 / 3, "loss": math.log(2)})


def test_epoch0_baseline_of_mlm():
    from tasks.jobs import JobSpec, get

    history = [{"epoch": 0, "eval_loss": 6.0, "perplexity": 403.4, "eval_masked_accuracy": 0.05},
               {"epoch": 1, "train_loss": 5.0, "eval_loss": 5.0, "perplexity": 148.4, "eval_masked_accuracy": 0.1}]
    b = get("mlm").baseline("unused", history, JobSpec(job="mlm"))
    assert b == {"loss": 6.0, "perplexity": 403.4, "accuracy": 0.05}
    with pytest.raises(LookupError, match="epoch-0"):
        get("mlm").baseline("unused", history[1:], JobSpec(job="mlm"))


def test_champion_that_cannot_be_evaluated_blocks_automatic_promotion():
    d = decide("f1", 0.9, None, champion_error="RuntimeError: cannot load")
    assert not d.promoted and "finetune promote" in d.reason


def test_metric_names_defaults_and_synonyms():
    assert resolve_metric(ClassifyConfig().spec()) == "f1"
    assert resolve_metric(MLMConfig().spec()) == "perplexity"
    assert resolve_metric("classify", "macro-F1") == "f1"
    assert resolve_metric("classify", "eval_loss") == "loss"
    assert resolve_metric("mlm", "eval_perplexity") == "perplexity"
    assert resolve_metric(ClassifyConfig(tracking={"promotion_metric": "accuracy"}).spec()) == "accuracy"
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


def _patch_scores(monkeypatch, scores: dict[str, float | Exception], smoke: dict[str, str | None] | None = None,
                  baseline: float = 0.1):
    import tasks.promotion as p

    monkeypatch.setattr(p, "baseline_scores", lambda cfg, name, version, data_path, history: (
        {"f1": baseline, "accuracy": baseline, "loss": 1 - baseline}, None))

    def fake_eval(uri, cfg, data_path, tokenized_path):
        s = scores[uri.rsplit("/", 1)[-1]]
        if isinstance(s, Exception):
            return None, f"{type(s).__name__}: {s}"
        return {"f1": s, "accuracy": s, "loss": 1 - s}, None

    monkeypatch.setattr(p, "_evaluate", fake_eval)
    monkeypatch.setattr(p, "smoke_test", lambda uri, job: (smoke or {}).get(uri.rsplit("/", 1)[-1]))


def test_champion_moves_only_when_the_challenger_wins(fake_versions, monkeypatch):
    from tasks.promotion import champion_challenger
    from tasks import registry

    name, add = fake_versions
    cfg = ClassifyConfig(tracking={"promotion_margin": 0.05})
    _patch_scores(monkeypatch, {"1": 0.60, "2": 0.63, "3": 0.70})

    v1 = add()
    r1 = champion_challenger(cfg.spec(), name, v1, margin=cfg.tracking.promotion_margin, data_path="unused")
    assert r1["promoted"] and registry.alias_version(name, "champion") == "1"

    v2 = add()
    registry.set_alias(name, "challenger", v2)
    r2 = champion_challenger(cfg.spec(), name, v2, margin=cfg.tracking.promotion_margin, data_path="unused")
    assert not r2["promoted"] and registry.alias_version(name, "champion") == "1"
    assert registry.alias_version(name, "challenger") == "2"
    tags = registry.get_version(name, "2").tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.metric"] == "f1"
    assert float(tags["promotion.challenger_score"]) == pytest.approx(0.63)
    assert float(tags["promotion.champion_score"]) == pytest.approx(0.60)
    assert tags["promotion.champion_version"] == "1"
    assert tags["promotion.baseline"] == "majority-class" and float(tags["promotion.baseline_score"]) == pytest.approx(0.1)
    assert json.loads(tags["promotion.scores"])["baseline"]["accuracy"] == pytest.approx(0.1)
    assert len(tags) <= 10  # readable: a handful of tags, every score of the comparison in one JSON tag

    v3 = add()
    registry.set_alias(name, "challenger", v3)
    r3 = champion_challenger(cfg.spec(), name, v3, margin=cfg.tracking.promotion_margin, data_path="unused")
    assert r3["promoted"] and r3["champion_score"] == pytest.approx(0.60) and r3["challenger_score"] == pytest.approx(0.70)
    assert registry.aliases(name) == {"champion": "3", "previous-champion": "1"}  # the winner no longer `challenger`
    assert registry.get_version(name, "3").tags["promotion.decision"] == "promoted"
    assert registry.get_version(name, "3").tags[registry.REPLACED_TAG] == "1"


@pytest.mark.parametrize("failure", ["evaluation", "smoke"])
def test_failed_challenger_keeps_the_champion(fake_versions, monkeypatch, failure):
    from tasks.promotion import champion_challenger
    from tasks import registry

    name, add = fake_versions
    v1, v2 = add(), add()
    registry.set_alias(name, "champion", v1)
    registry.set_alias(name, "challenger", v2)
    if failure == "evaluation":
        _patch_scores(monkeypatch, {"1": 0.5, "2": OSError("weights missing")})
    else:
        _patch_scores(monkeypatch, {"1": 0.5, "2": 0.99}, smoke={"2": "KeyError: 'label'"})
    r = champion_challenger(ClassifyConfig().spec(), name, v2, data_path="unused")
    assert not r["promoted"] and registry.alias_version(name, "champion") == "1"
    assert r["challenger_error"] and registry.get_version(name, "2").tags["promotion.decision"] == "rejected"


def test_first_version_that_fails_smoke_is_not_champion(fake_versions, monkeypatch):
    from tasks.promotion import champion_challenger
    from tasks import registry

    name, add = fake_versions
    _patch_scores(monkeypatch, {"1": 0.9}, smoke={"1": "RuntimeError: boom"})
    r = champion_challenger(ClassifyConfig().spec(), name, add(), data_path="unused")
    assert not r["promoted"] and registry.alias_version(name, "champion") is None


def test_version_below_the_floor_gets_no_alias(fake_versions, monkeypatch):
    """The quality floor decides whether a version gets an alias at all: below it (or with non-finite metrics),
    no alias and a reason tag; `challenger` keeps pointing at the last candidate above it."""
    from tasks.promotion import champion_challenger
    from tasks import registry

    name, add = fake_versions
    _patch_scores(monkeypatch, {"1": 0.5, "2": 0.8, "3": 0.7, "4": 0.5, "5": float("nan")}, baseline=0.5)
    cfg = ClassifyConfig(tracking={"promotion_margin": 0.05})
    v1 = add()
    r = champion_challenger(cfg.spec(), name, v1, margin=cfg.tracking.promotion_margin, data_path="unused")
    assert not r["promoted"] and not r["qualified"] and registry.aliases(name) == {}
    assert "does not beat the majority-class baseline: f1 0.5000 vs baseline 0.5000" in r["decision"]
    assert "gets no alias (no challenger)" in r["decision"]
    assert r["baseline_score"] == pytest.approx(0.5) and r["baseline"] == "majority-class"
    tags = registry.get_version(name, "1").tags
    assert tags["promotion.decision"] == "rejected" and float(tags["promotion.baseline_score"]) == pytest.approx(0.5)
    assert tags["promotion.reason"].startswith("no alias: does not beat the majority-class baseline")
    assert champion_challenger(cfg.spec(), name, add(), margin=cfg.tracking.promotion_margin, data_path="unused")["promoted"]  # v2: champion
    r3 = champion_challenger(cfg.spec(), name, add(), margin=cfg.tracking.promotion_margin, data_path="unused")  # v3: above the floor, loses: challenger
    assert r3["qualified"] and not r3["promoted"] and registry.alias_version(name, "challenger") == "3"
    for bad in ("4", "5"):  # at the floor, then non-finite: challenger stays on v3
        r = champion_challenger(cfg.spec(), name, add(), margin=cfg.tracking.promotion_margin, data_path="unused")
        assert not r["qualified"] and f"gets no alias (challenger stays v3)" in r["decision"], r["decision"]
        assert registry.aliases(name) == {"champion": "2", "challenger": "3"}
        assert registry.get_version(name, bad).tags["promotion.reason"].startswith("no alias: ")
    assert "nan" in registry.get_version(name, "5").tags["promotion.reason"].lower()


def test_score_cache_is_one_json_tag_and_old_tags_still_read(fake_versions):
    from tasks.promotion import stored_scores, store_scores
    from tasks import registry

    name, add = fake_versions
    v = add()
    registry.set_version_tags(name, v, {"eval.0123456789ab.f1": "0.75", "eval.0123456789ab.loss": "0.5"})  # old form
    assert stored_scores(name, v, "0123456789ab") == {"f1": 0.75, "loss": 0.5}
    store_scores(name, v, "ba9876543210", {"f1": 0.8125, "loss": 0.25})
    store_scores(name, v, "ffffffffffff", {"f1": 0.5})
    tags = registry.get_version(name, v).tags
    assert json.loads(tags["eval.scores"]) == {"ba9876543210": {"f1": 0.8125, "loss": 0.25}, "ffffffffffff": {"f1": 0.5}}
    assert stored_scores(name, v, "ba9876543210") == {"f1": 0.8125, "loss": 0.25}
    assert stored_scores(name, v, "0123456789ab") == {"f1": 0.75, "loss": 0.5}
    assert stored_scores(name, v, "000000000000") is None


def test_baseline_from_the_version_run_when_no_history_is_given(store, monkeypatch):
    """Outside the training flow (no history passed) the MLM floor is read back from the version's run metrics."""
    import tasks.promotion as p
    from tasks import registry, tracking

    run_id = tracking.start_run("cc", "r", {"job": "mlm"})
    log = tracking.MetricsLogger(run_id)
    log({"eval_loss": 6.0, "perplexity": 403.0, "eval_masked_accuracy": 0.05}, 0)
    log({"train_loss": 5.5, "eval_loss": 5.0, "perplexity": 148.0, "eval_masked_accuracy": 0.1}, 1)
    v = registry.register_model(f"runs:/{run_id}/model", "cc-mlm", run_id)
    scores, err = p.baseline_scores(MLMConfig().spec(), "cc-mlm", v, "unused", None)
    assert err is None and scores == {"loss": 6.0, "perplexity": 403.0, "accuracy": 0.05}
    scores, err = p.baseline_scores(ClassifyConfig().spec(), "cc-mlm", v, "/no/such/data", None)
    assert scores is None and err  # the classification floor needs the eval data


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
    from tasks.promotion import evaluate_registered, smoke_test

    uris, clf_data, mlm_data = tiny_registered
    # no tokenized split given: the eval texts are tokenized (and, for MLM, masked once) with the model's tokenizer
    clf_cfg = ClassifyConfig(data={"max_length": 32})
    clf = evaluate_registered(uris["clf"], clf_cfg.spec(), clf_data)
    assert set(clf) == {"loss", "accuracy", "f1"} and 0 <= clf["accuracy"] <= 1
    assert clf["loss"] == pytest.approx(math.log(2), abs=0.1)  # an untrained 2-class head: near chance
    mlm_cfg = MLMConfig(data={"max_length": 32})
    mlm = evaluate_registered(uris["mlm"], mlm_cfg.spec(), mlm_data)
    assert mlm["perplexity"] == pytest.approx(math.exp(mlm["loss"])) and mlm["perplexity"] > 100  # random weights
    assert evaluate_registered(uris["mlm"], mlm_cfg.spec(), mlm_data) == mlm  # masks fixed once: same score twice
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
