"""Bring your own encoder: the same jobs on a tiny random model of every encoder family (BERT, RoBERTa, DistilBERT,
ELECTRA, DeBERTa-v2, ModernBERT), each saved with a tokenizer of its own kind (tests/conftest.py `build_family`).
Each cell runs the real flow: tokenize -> loaders -> train -> register -> promotion probe -> predict from the
registry (fill-mask with the family's own mask token, asked with `[MASK]`)."""
from __future__ import annotations

import os

import pytest

from conftest import FAMILIES
from flows.config import MLMConfig
from tests.test_classify_flow import flow_cfg

pytestmark = pytest.mark.usefixtures("prefect_harness")

CORPUS = ["this is a great movie !", "the cat sat on the mat .", "a wonderful story with a great cast ."]


def _mlm_cfg(model: str, corpus: str, out: str, engine: str, name: str, **over) -> MLMConfig:
    raw = dict(
        engine=engine, group_texts=False,
        data={"dataset": corpus, "max_length": 16, "eval_fraction": 0.2, "eval_samples": 32},
        train={"model": model, "epochs": 1, "batch_size": 16, "learning_rate": 1e-2, "output_dir": out, "seed": 0},
        tracking={"registered_model": name},
    )
    raw.update(over)
    return MLMConfig.model_validate(raw)


def _probe_passed(out: dict) -> None:
    assert out["version"] == "1", out
    assert out["promotion"]["challenger_error"] is None, out["promotion"]


@pytest.mark.parametrize("engine", ["manual", "trainer"])
@pytest.mark.parametrize("family", FAMILIES)
def test_classify_family(family, engine, family_model_dirs, sentiment_csv, tmp_path, isolated):
    from flows.classify import classify_flow
    from tasks.predict import predict

    name = f"cls-{family}-{engine}"
    out = classify_flow(flow_cfg(sentiment_csv, family_model_dirs[family], tmp_path, engine=engine,
                                 train={"epochs": 2}, tracking={"registered_model": name}))
    _probe_passed(out)
    res = predict(f"models:/{name}/1", ["a great wonderful film", "an awful boring mess"])
    assert [r["label"] in ("positive", "negative") for r in res] == [True, True]


@pytest.mark.parametrize("engine", ["sft", "manual"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mlm_family(family, engine, family_model_dirs, isolated):
    from transformers import AutoTokenizer

    from flows.mlm import mlm_flow
    from tasks.predict import predict

    corpus = isolated / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 40) + "\n")
    name = f"mlm-{family}-{engine}"
    out = mlm_flow(_mlm_cfg(family_model_dirs[family], str(corpus), str(isolated / "out"), engine, name))
    _probe_passed(out)
    assert out["metrics"]["perplexity"] < out["metrics"]["epoch0_perplexity"]
    res = predict(f"models:/{name}/1", ["this is a [MASK] movie !"], top_k=3)
    mask = AutoTokenizer.from_pretrained(family_model_dirs[family]).mask_token
    cands = res[0]["masks"][0]
    assert len(cands) == 3 and all(mask not in c["sequence"] for c in cands)
