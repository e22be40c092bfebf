"""Both engines on a tiny config-built BERT and a learnable few-row CSV."""
import json
from pathlib import Path

import torch

from flows.config import ClassifyConfig
from tasks.data import prepare_dataset
from tasks.tokenize import tokenize_dataset
from tasks.training import train


def train_classifier(cfg, data, tokenized, run_dir, **kw):
    """The core trainer on a classify config (the job's spec carries the label names)."""
    return train(cfg.spec(data.label_names), tokenized, run_dir, **kw)


def make_cfg(csv, model, tmp_path, engine="manual", **train):
    t = {"model": model, "freeze_embeddings": False, "dropout": None, "group_by_length": False, "epochs": 8, "batch_size": 8, "learning_rate": 1e-2, "warmup_ratio": 0.0,
         "output_dir": str(tmp_path / "out"), **train}
    return ClassifyConfig.model_validate({
        "engine": engine,
        "data": {"dataset": csv, "text_column": "review", "label_column": "sentiment", "max_length": 16,
                 "eval_fraction": 0.25},
        "train": t,
    })


def run(cfg, tmp_path, name="run", metrics=None):
    data = prepare_dataset(cfg.data, cfg.train.seed)
    tok = tokenize_dataset(data.path, cfg.train.model, cfg.data.max_length)
    cb = (lambda m, step: metrics.append((step, m))) if metrics is not None else None
    return train_classifier(cfg, data, tok, str(tmp_path / name), on_metrics=cb)


def test_manual_loss_falls_params_change_and_files_written(sentiment_csv, tiny_model_dir, tmp_path, isolated):
    from transformers import AutoModel

    cfg = make_cfg(sentiment_csv, tiny_model_dir, tmp_path)
    metrics = []
    res = run(cfg, tmp_path, metrics=metrics)
    losses = [h["train_loss"] for h in res.history]
    assert len(res.history) == 8 and losses[-1] < losses[0] * 0.5, losses
    assert res.final["eval_accuracy"] >= 0.75
    # one callback per epoch, step = epoch, the shared metric names
    assert [s for s, _ in metrics] == list(range(1, 9))
    assert set(metrics[0][1]) == {"train_loss", "eval_loss", "eval_accuracy", "eval_f1"}
    # parameters actually changed
    before = AutoModel.from_pretrained(tiny_model_dir).embeddings.word_embeddings.weight
    after = AutoModel.from_pretrained(res.model_dir).embeddings.word_embeddings.weight
    assert not torch.allclose(before, after)
    # the saved model carries label names, config and metrics
    saved = json.loads((Path(res.model_dir) / "config.json").read_text())
    assert saved["id2label"] == {"0": "negative", "1": "positive"}
    assert (Path(res.model_dir) / "config.yaml").exists() and (Path(res.model_dir) / "metrics.json").exists()
    assert (Path(tmp_path / "run") / "eval_extras.json").exists()


def test_seed_reproduces_losses(sentiment_csv, tiny_model_dir, tmp_path, isolated):
    cfg = make_cfg(sentiment_csv, tiny_model_dir, tmp_path, epochs=2)
    a = run(cfg, tmp_path, "a").history
    b = run(cfg, tmp_path, "b").history
    assert [h["train_loss"] for h in a] == [h["train_loss"] for h in b]
    c = run(make_cfg(sentiment_csv, tiny_model_dir, tmp_path, epochs=2, seed=7), tmp_path, "c").history
    assert [h["train_loss"] for h in a] != [h["train_loss"] for h in c]


def test_trainer_engine_logs_the_same_metric_names(sentiment_csv, tiny_model_dir, tmp_path, isolated):
    cfg = make_cfg(sentiment_csv, tiny_model_dir, tmp_path, engine="trainer", epochs=5)
    metrics = []
    res = run(cfg, tmp_path, metrics=metrics)
    assert [s for s, _ in metrics] == [1, 2, 3, 4, 5]
    assert set(metrics[-1][1]) == {"train_loss", "eval_loss", "eval_accuracy", "eval_f1"}
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert (Path(res.model_dir) / "model.safetensors").exists()
