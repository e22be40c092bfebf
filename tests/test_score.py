"""Batch scoring (tasks/scoring.py, `finetune score`): a tiny classifier and a tiny fill-mask model registered in
an MLflow sqlite store for this module; inputs of a few dozen rows in each format."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import NEGATIVE, POSITIVE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    """MLflow on sqlite with `tiny-cls` v1 (champion) and v2, and `tiny-mlm` v1 (champion)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("score-registry")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("FINETUNE_CACHE_DIR", str(root / "cache"))
    import tasks.tracking as tracking

    mp.setattr(tracking, "STORE_DIR", root / "mlstore")
    from tasks import registry as reg

    cls_dir = root / "cls"
    m = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=2, id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1})
    m.save_pretrained(cls_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(cls_dir)
    for name, path, task, n in (("tiny-cls", cls_dir, "text-classification", 2),
                                ("tiny-mlm", tiny_model_dir, "fill-mask", 1)):
        for _ in range(n):
            run = tracking.start_run("score-test", name, {})
            uri = tracking.log_model(run, str(path), task)
            v = reg.register_model(uri, name, run, tags={"job": "classify" if n == 2 else "mlm"})
            tracking.end_run(run)
        reg.set_alias(name, "champion", "1")
    yield root
    mp.undo()


def texts(n: int) -> list[str]:
    pool = POSITIVE + NEGATIVE
    return [pool[i % len(pool)] + " !" * (i % 5) for i in range(n)]


def write_csv(path: Path, n: int, extra: dict[int, str] | None = None) -> Path:
    import csv

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "review"])
        for i, t in enumerate(texts(n)):
            w.writerow([f"{i:04d}", (extra or {}).get(i, t)])
    return path


def cfg(tmp_path, **kw):
    from tasks.scoring import ScoreConfig

    base = dict(registered_model="tiny-cls", input=str(tmp_path / "in.csv"), output=str(tmp_path / "out.parquet"),
                text_column="review", id_columns=["id"], chunk_rows=7, batch_size=4)
    return ScoreConfig(**{**base, **kw})


def test_local_csv_scores_every_row_in_order_with_version_metadata(registry, tmp_path):
    import pyarrow.parquet as pq

    from tasks.scoring import META_KEY, score

    write_csv(tmp_path / "in.csv", 30, extra={3: "", 4: "   "})
    s = score(cfg(tmp_path))
    t = pq.read_table(tmp_path / "out.parquet")
    assert t.column_names == ["row", "id", "skipped", "label", "score"]
    assert t.column("row").to_pylist() == list(range(30))
    assert t.column("id").to_pylist() == [f"{i:04d}" for i in range(30)]  # unchanged: leading zeros kept
    labels = t.column("label").to_pylist()
    assert labels[3] is None and labels[4] is None and t.column("skipped").to_pylist()[3] == "empty text"
    assert all(lbl in ("negative", "positive") for i, lbl in enumerate(labels) if i not in (3, 4))
    assert s["rows_in"] == s["rows_out"] == 30 and s["skipped"] == {"empty text": 2}
    meta = json.loads(t.schema.metadata[META_KEY])
    assert meta["model"]["version"] == "1" and meta["model"]["run_id"]
    side = json.loads((tmp_path / "out.parquet.meta.json").read_text())
    assert side["model"] == meta["model"] and side["rows_skipped"] == 2
    assert not (tmp_path / ".out.parquet.parts").exists()
    # the same rows scored one at a time through the pyfunc path: the same labels (bf16 or not: argmax on 2 labels)
    import mlflow

    df = mlflow.pyfunc.load_model("models:/tiny-cls/1").predict([texts(30)[0], texts(30)[10]])
    assert list(df["label"]) == [labels[0], labels[10]]


def test_ray_two_actors_match_local_row_for_row(registry, tmp_path):
    """Ray Data with 2 actors on a local Ray: the same rows, ids, labels and skips as the local path; scores equal
    to float tolerance (the actors run 1 thread each, the local path 2: matmul sums in another order)."""
    import pyarrow.parquet as pq

    from tasks.scoring import score

    write_csv(tmp_path / "in.csv", 40, extra={5: ""})
    local = score(cfg(tmp_path, output=str(tmp_path / "local.parquet")))
    on_ray = score(cfg(tmp_path, output=str(tmp_path / "ray.parquet"), workers=2))
    a, b = pq.read_table(tmp_path / "local.parquet"), pq.read_table(tmp_path / "ray.parquet")
    assert on_ray["engine"] == "ray" and "2 actor(s)" in on_ray["device"]
    assert a.schema.names == b.schema.names and len(a) == len(b) == 40
    for c in ("row", "id", "skipped", "label"):
        assert a.column(c).to_pylist() == b.column(c).to_pylist(), c
    sa = [x for x in a.column("score").to_pylist() if x is not None]
    sb = [x for x in b.column("score").to_pylist() if x is not None]
    assert sa == pytest.approx(sb, abs=2e-3)
    assert local["model"] == on_ray["model"]
