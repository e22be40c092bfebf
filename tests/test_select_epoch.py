"""Best epoch and early stopping (issue 12, item 3): the saved (and registered) weights are the best epoch's by the
promotion metric (`select: best`) or the last (`select: last`), early stopping ends training after `patience`
epochs without improvement, both engines, and a resumed run keeps the best epoch.

The selection metric is scripted: classify's evaluation runs for real (the loss and accuracy are the model's), but
its macro-F1, the default promotion metric, comes from SCORES by the epoch being evaluated. Which weights were
saved is checked by their real eval loss, which differs between epochs (learning rate 1e-2)."""
import json
import math
import re
from pathlib import Path

import pytest

from flows.config import ClassifyConfig
from tasks.data import prepare_dataset
from tasks.tokenize import tokenize_dataset
from tasks.training import track_best, train

SCORES = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7, 5: 0.8}  # best: epoch 2; epoch 3 is the first without improvement


def cfg_for(csv, model, out, engine="manual", **train):
    return ClassifyConfig.model_validate({
        "engine": engine,
        "data": {"dataset": csv, "text_column": "review", "label_column": "sentiment", "max_length": 16,
                 "eval_fraction": 0.25},
        "train": {"model": model, "freeze_embeddings": False, "dropout": None, "group_by_length": False, "epochs": 4, "batch_size": 8, "learning_rate": 1e-2, "warmup_ratio": 0.0,
                  "output_dir": str(out), **train},
    })


@pytest.fixture
def scripted(monkeypatch):
    """evaluate_classifier with f1 taken from SCORES for 'eval epoch N'; records (desc, real eval loss)."""
    import tasks.evaluate as ev

    real, calls = ev.evaluate_classifier, []

    def fake(model, loader, device, dtype=None, desc="eval"):
        r = real(model, loader, device, dtype, desc=desc)
        calls.append((desc, r["loss"]))
        m = re.fullmatch(r"eval epoch (\d+)", desc)
        if m:
            r["f1"] = SCORES[int(m.group(1))]
        return r

    monkeypatch.setattr(ev, "evaluate_classifier", fake)
    return calls


def _prepare(cfg):
    data = prepare_dataset(cfg.data, cfg.train.seed)
    return data, tokenize_dataset(data.path, cfg.train.model, cfg.data.max_length)


def _train(cfg, data, tok, run_dir, **kw):
    return train(cfg.spec(data.label_names), tok, str(run_dir), **kw)


def _row(res, epoch):
    return next(r for r in res.history if r["epoch"] == epoch)


def _saved_eval_loss(calls):
    """The real eval loss of the weights saved: the re-evaluation train() runs after restoring a selected epoch."""
    [loss] = [loss for desc, loss in calls if desc.endswith("(selected)")]
    return loss


def test_track_best_rule():
    h = [{"epoch": 0, "f": 0.99}, {"epoch": 1, "f": 0.5}, {"epoch": 2, "f": 0.7}, {"epoch": 3, "f": 0.7},
         {"epoch": 4, "f": math.nan}]
    p = track_best(h, "f", True)
    # epoch 0 (untrained) is never a candidate; a tie keeps the earlier epoch; NaN never improves
    assert (p.best_epoch, p.best_value, p.epochs_without_improvement) == (2, 0.7, 2)
    assert p.should_stop(2) and not p.should_stop(3) and not p.should_stop(None)
    lower = track_best([{"epoch": 1, "l": 2.0}, {"epoch": 2, "l": math.inf}, {"epoch": 3, "l": 1.0}], "l", False)
    assert (lower.best_epoch, lower.epochs_without_improvement) == (3, 0)
    assert track_best([{"epoch": 1, "l": math.nan}], "l", False).best_epoch is None


@pytest.mark.parametrize("engine", ["manual", "trainer"])
def test_best_epoch_is_saved_not_the_last(engine, scripted, sentiment_csv, tiny_model_dir, tmp_path, isolated):
    from transformers import AutoModelForSequenceClassification

    from tasks.evaluate import evaluate_classifier
    from tasks.training import build_loaders

    cfg = cfg_for(sentiment_csv, tiny_model_dir, tmp_path / "o", engine)
    data, tok = _prepare(cfg)
    res = _train(cfg, data, tok, tmp_path / "run")
    assert [r["epoch"] for r in res.history] == [1, 2, 3, 4]  # history keeps every epoch
    assert (res.selected_epoch, res.best_epoch, res.stopped_early_at) == (2, 2, None)
    assert res.final == _row(res, 2) and res.selection_metric == "eval_f1"
    assert _row(res, 2)["eval_loss"] != pytest.approx(_row(res, 4)["eval_loss"], rel=1e-3)
    # the weights in memory at save time are epoch 2's ...
    assert _saved_eval_loss(scripted) == pytest.approx(_row(res, 2)["eval_loss"], rel=1e-4)
    # ... and so are the saved ones, loaded back from the model dir
    spec = cfg.spec(data.label_names)
    model = AutoModelForSequenceClassification.from_pretrained(res.model_dir)
    loaders = build_loaders(tok, spec)
    import torch

    again = evaluate_classifier(model, loaders["eval"], torch.device("cpu"), desc="check")
    assert again["loss"] == pytest.approx(_row(res, 2)["eval_loss"], rel=1e-4)
    saved = json.loads((Path(res.model_dir) / "metrics.json").read_text())
    assert saved["selected_epoch"] == 2 and saved["final"]["epoch"] == 2 and len(saved["history"]) == 4


@pytest.mark.parametrize("engine", ["manual", "trainer"])
def test_select_last_keeps_the_last_epoch(engine, scripted, sentiment_csv, tiny_model_dir, tmp_path, isolated):
    cfg = cfg_for(sentiment_csv, tiny_model_dir, tmp_path / "o", engine, epochs=3, select="last")
    data, tok = _prepare(cfg)
    res = _train(cfg, data, tok, tmp_path / "run")
    assert (res.selected_epoch, res.best_epoch) == (3, 2) and res.final == _row(res, 3)
    assert not any(desc.endswith("(selected)") for desc, _ in scripted)  # the model in memory is the last epoch's


@pytest.mark.parametrize("engine", ["manual", "trainer"])
def test_early_stopping_after_patience_epochs(engine, scripted, sentiment_csv, tiny_model_dir, tmp_path, isolated):
    cfg = cfg_for(sentiment_csv, tiny_model_dir, tmp_path / "o", engine, epochs=5, early_stopping_patience=2)
    data, tok = _prepare(cfg)
    logged = []
    res = _train(cfg, data, tok, tmp_path / "run", on_metrics=lambda m, s: logged.append(s))
    # epochs 3 and 4 do not beat epoch 2's 0.9: stop after epoch 4, epoch 5 never trains
    assert [r["epoch"] for r in res.history] == [1, 2, 3, 4] and logged == [1, 2, 3, 4]
    assert (res.selected_epoch, res.best_epoch, res.stopped_early_at) == (2, 2, 4)
    assert _saved_eval_loss(scripted) == pytest.approx(_row(res, 2)["eval_loss"], rel=1e-4)
    saved = json.loads((Path(res.model_dir) / "metrics.json").read_text())
    assert saved["stopped_early_at"] == 4


class Boom(Exception):
    pass


@pytest.mark.parametrize("engine,crash_after", [("manual", 2), ("manual", 3), ("trainer", 3)])
def test_resume_keeps_the_best_epoch(engine, crash_after, scripted, sentiment_csv, tiny_model_dir, tmp_path,
                                     isolated):
    """Killed after epoch `crash_after` (2: the best is the checkpoint's own model; 3: the best weights travel in the
    checkpoint / Trainer keeps the best checkpoint), resumed: the saved weights are still epoch 2's, as in an
    uninterrupted run, and early stopping counts across the interruption."""
    kw = {"checkpoint_every_steps": 2} if engine == "manual" else {}
    cfg = cfg_for(sentiment_csv, tiny_model_dir, tmp_path / "o", engine, epochs=5, early_stopping_patience=3, **kw)
    data, tok = _prepare(cfg)
    full = _train(cfg, data, tok, tmp_path / "full")
    assert (full.selected_epoch, full.stopped_early_at) == (2, None)  # 3 epochs without improvement: 3, 4, 5
    scripted.clear()

    def crash(metrics, step):
        if step == crash_after:
            raise Boom(f"killed after epoch {crash_after}")

    with pytest.raises(Boom):
        _train(cfg, data, tok, tmp_path / "cut", on_metrics=crash)
    resumed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"resume": True})})
    res = _train(resumed, data, tok, tmp_path / "cut")
    assert res.resumed_from and [r["epoch"] for r in res.history] == [1, 2, 3, 4, 5]
    assert (res.selected_epoch, res.best_epoch) == (2, 2)
    assert _saved_eval_loss(scripted) == pytest.approx(full.final["eval_loss"], rel=1e-4)
    assert res.final["eval_loss"] == pytest.approx(full.final["eval_loss"], rel=1e-4)


@pytest.mark.parametrize("engine", ["manual", "trainer"])
def test_resume_of_a_run_that_stopped_early_trains_no_further(engine, scripted, sentiment_csv, tiny_model_dir,
                                                              tmp_path, isolated):
    cfg = cfg_for(sentiment_csv, tiny_model_dir, tmp_path / "o", engine, epochs=5, early_stopping_patience=1)
    data, tok = _prepare(cfg)
    first = _train(cfg, data, tok, tmp_path / "run")
    assert first.stopped_early_at == 3
    scripted.clear()
    again = cfg.model_copy(update={"train": cfg.train.model_copy(update={"resume": True})})
    res = _train(again, data, tok, tmp_path / "run")
    assert [r["epoch"] for r in res.history] == [1, 2, 3] and (res.selected_epoch, res.stopped_early_at) == (2, 3)
    assert not any(re.fullmatch(r"eval epoch \d+", d) for d, _ in scripted)  # nothing trained or evaluated again
    assert _saved_eval_loss(scripted) == pytest.approx(first.final["eval_loss"], rel=1e-4)


def test_lora_keeps_the_best_adapter(scripted, sentiment_csv, tiny_model_dir, tmp_path, isolated):
    base = cfg_for(sentiment_csv, tiny_model_dir, tmp_path / "o", epochs=3)
    cfg = base.model_copy(update={"peft": "lora"})
    data, tok = _prepare(cfg)
    res = _train(cfg, data, tok, tmp_path / "run")
    assert res.selected_epoch == 2
    assert _saved_eval_loss(scripted) == pytest.approx(_row(res, 2)["eval_loss"], rel=1e-4)


def test_promotion_metric_selects_and_the_run_records_the_epoch(scripted, sentiment_csv, tiny_model_dir, tmp_path,
                                                                isolated, prefect_harness):
    """Selection follows --promotion-metric (here eval_loss, lower is better: real values), and the MLflow run says
    which epoch was registered; the registered model scores what the run's final metrics say."""
    from mlflow import MlflowClient

    from flows.classify import classify_flow

    base = cfg_for(sentiment_csv, tiny_model_dir, tmp_path / "o", epochs=3, early_stopping_patience=1)
    cfg = base.model_copy(update={"tracking": base.tracking.model_copy(update={
        "registered_model": "sel", "experiment": "sel", "promotion_metric": "loss"})})
    out = classify_flow(cfg)
    losses = {r["epoch"]: r["eval_loss"] for r in out["history"]}
    best = min(losses, key=losses.get)
    assert out["selected_epoch"] == best and out["metrics"]["eval_loss"] == pytest.approx(losses[best])
    tags = MlflowClient().get_run(out["run_id"]).data.tags
    assert tags["selected_epoch"] == str(best) and tags["selection_metric"] == "eval_loss"
    assert ("stopped_early_at" in tags) == (out["stopped_early_at"] is not None)
    assert out["promotion"]["challenger_scores"]["loss"] == pytest.approx(out["metrics"]["eval_loss"], rel=1e-5)
