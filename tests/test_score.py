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

from tests.conftest import FAMILIES, NEGATIVE, POSITIVE

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
            reg.register_model(uri, name, run, tags={"job": "classify" if n == 2 else "mlm"})
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
                text_column="review", id_columns=["id"], chunk_rows=7, batch_size=4,
                precision="fp32")  # bf16 autocast on a 32-wide model is slow on the CPU; the first test runs auto
    return ScoreConfig(**{**base, **kw})


def test_local_csv_scores_every_row_in_order_with_version_metadata(registry, tmp_path):
    import pyarrow.parquet as pq

    from tasks.scoring import META_KEY, score

    write_csv(tmp_path / "in.csv", 30, extra={3: "", 4: "   "})
    s = score(cfg(tmp_path, precision="auto"))
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
    assert "threshold" not in side and "threshold" not in meta  # single-label: no threshold picked anything
    assert not (tmp_path / ".out.parquet.parts").exists()
    # the same rows scored one at a time through the pyfunc path: the same labels (bf16 or not: argmax on 2 labels)
    import mlflow

    df = mlflow.pyfunc.load_model("models:/tiny-cls/1").predict([texts(30)[0], texts(30)[10]])
    assert list(df["label"]) == [labels[0], labels[10]]


@pytest.mark.slow  # a local Ray and two actors: about a minute
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


def test_jsonl_nontext_cells_fill_mask_and_csv_output(registry, tmp_path):
    """JSONL with a number and a null where text belongs, a text without a mask: kept with null predictions and
    counted; fill-mask gives top-k tokens per mask; CSV output (nested lists as JSON)."""
    import csv

    from tasks.scoring import score

    rows = [{"k": 1, "text": "a great [MASK] ."}, {"k": 2, "text": 5}, {"k": 3, "text": None},
            {"k": 4, "text": "no mask here"}, {"k": 5, "text": "[MASK] and [MASK] ."}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = score(cfg(tmp_path, registered_model="tiny-mlm", input=str(tmp_path / "in.jsonl"), text_column="text",
                  id_columns=["k"], output=str(tmp_path / "out.csv"), output_format="csv", top_k=3, chunk_rows=2))
    assert s["skipped"] == {"not text": 1, "empty text": 1, "no mask": 1} and s["rows_out"] == 5
    with open(tmp_path / "out.csv") as f:
        out = list(csv.DictReader(f))
    assert [r["k"] for r in out] == ["1", "2", "3", "4", "5"]
    assert [r["skipped"] for r in out] == ["", "not text", "empty text", "no mask", ""]
    first, last = json.loads(out[0]["tokens"]), json.loads(out[4]["tokens"])
    assert len(first) == 1 and len(first[0]) == 3 and len(last) == 2  # one list per mask, top-3 each
    assert out[1]["tokens"] == ""


def test_alias_moved_mid_job_and_resume_keep_the_version_it_started_with(registry, tmp_path, monkeypatch):
    """champion -> v2 while the job runs: v1 scores every row. A crash after two chunks, champion still v2: the
    resumed job continues with v1, scores only the unfinished chunks, and the file has each row exactly once."""
    import pyarrow.parquet as pq

    from tasks import registry as reg
    from tasks import scoring

    write_csv(tmp_path / "in.csv", 30)
    calls = []

    def crash_after_two(done, total):
        calls.append(done)
        if len(calls) == 2:
            reg.set_alias("tiny-cls", "champion", "2")
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")

    try:
        with pytest.raises(KeyboardInterrupt):
            scoring.score(cfg(tmp_path), progress=crash_after_two)
        parts = scoring.parts_dir(tmp_path / "out.parquet")
        assert scoring.done_parts(parts) == {0, 1} and not (tmp_path / "out.parquet").exists()
        # without --resume: one error naming the fix
        with pytest.raises(scoring.ConfigError, match="--resume"):
            scoring.score(cfg(tmp_path))
        s = scoring.score(cfg(tmp_path, resume=True))
    finally:
        reg.set_alias("tiny-cls", "champion", "1")
    assert s["model"]["version"] == "1" and s["resumed_rows"] == 14 and s["rows_scored_this_run"] == 16
    rows = pq.read_table(tmp_path / "out.parquet").column("row").to_pylist()
    assert rows == list(range(30))


@pytest.mark.slow  # two CLI processes: about 30 s on an idle 2-core machine
def test_killed_cli_job_resumes_with_each_row_once(registry, tmp_path):
    """`finetune score` killed with SIGKILL mid-file, then `--resume`: one row per input row."""
    import pyarrow.parquet as pq

    from tasks.scoring import parts_dir

    write_csv(tmp_path / "in.csv", 600)
    out = tmp_path / "out.parquet"
    argv = [sys.executable, "-m", "flows.cli", "score", "--registered-model", "tiny-cls", "--input",
            str(tmp_path / "in.csv"), "--output", str(out), "--text-column", "review", "--id-columns", "id",
            "--chunk-rows", "6", "--batch-size", "2", "--precision", "fp32"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = parts_dir(out)
    deadline = time.time() + 240
    while len(list(parts.glob("part-*.parquet"))) < 3 and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not out.exists(), "the job finished before it was killed: give it more rows"
    n_done = len(list(parts.glob("part-*.parquet")))
    r = subprocess.run(argv + ["--resume", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout[r.stdout.index("{"):])
    assert s["resumed_rows"] >= 6 * n_done and s["rows_scored_this_run"] == 600 - s["resumed_rows"]
    t = pq.read_table(out)
    assert t.column("row").to_pylist() == list(range(600))
    assert t.column("id").to_pylist() == [f"{i:04d}" for i in range(600)]
    assert not parts.exists()


@pytest.mark.parametrize("case", ["missing column", "unreadable", "malformed csv", "no alias", "no version",
                                  "alias and version"])
def test_bad_input_is_one_error_line(registry, tmp_path, capsys, case):
    from flows import cli

    write_csv(tmp_path / "in.csv", 4)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "bad.csv").write_text("id,review\n1,fine\n2,a, b\n")
    base = ["score", "--registered-model", "tiny-cls", "--input", str(tmp_path / "in.csv"), "--output",
            str(tmp_path / "o.parquet"), "--text-column", "review"]
    extra, expect = {
        "missing column": (["--id-columns", "id,nope"], "no column 'nope' (--id-columns)"),
        "unreadable": (["--input", str(tmp_path / "bad.parquet")], "unreadable"),
        "malformed csv": (["--input", str(tmp_path / "bad.csv")], "unreadable as csv"),
        "no alias": (["--alias", "gold"], "no alias 'gold'"),
        "no version": (["--version", "9"], "no version 9"),
        "alias and version": (["--alias", "champion", "--version", "1"], "mutually exclusive"),
    }[case]
    assert cli.main(base + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expect in err[0], err
    assert not (tmp_path / "o.parquet").exists()


@pytest.mark.usefixtures("prefect_harness")
def test_score_flow_progress_and_summary_artifacts(registry, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.score import score_flow

    write_csv(tmp_path / "in.csv", 20, extra={2: ""})
    s = score_flow(cfg(tmp_path))
    assert s["rows_out"] == 20 and s["skipped"] == {"empty text": 1} and s["model"]["version"] == "1"
    with get_client(sync_client=True) as c:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="tiny-cls-score")))
    by_key = {a.key: a for a in arts}
    assert by_key["tiny-cls-score-progress"].data == 100.0
    md = by_key["tiny-cls-score-summary"].data
    assert "version 1" in md and "rows skipped" in md and "empty text" in md and str(tmp_path / "out.parquet") in md


def test_heads_by_problem_type():
    """The predictor follows the model config: single-label, multi-label above the threshold, regression; models
    of another task are a ConfigError. (No job trains multi-label or regression yet: the heads alone.)"""
    import torch
    from transformers import BertConfig

    from tasks.common import ConfigError
    from tasks.scoring import FillMask, MultiLabel, Regression, SingleLabel, head_class

    names = {0: "a", 1: "b", 2: "c"}
    assert head_class("text-classification", BertConfig(id2label=names)) is SingleLabel
    multi_cfg = BertConfig(id2label=names, problem_type="multi_label_classification")
    assert head_class("text-classification", multi_cfg) is MultiLabel
    assert head_class("text-classification", BertConfig(num_labels=1)) is Regression
    assert head_class("fill-mask", BertConfig()) is FillMask
    with pytest.raises(ConfigError, match="cannot be batch-scored"):
        head_class("token-classification", BertConfig())

    class M:
        config = multi_cfg

    logits = torch.tensor([[3.0, -3.0, 1.0], [-3.0, -3.0, -3.0]])
    rows = MultiLabel(M, None, type("C", (), {"threshold": 0.5})()).rows(logits, {})
    assert [r["labels"] for r in rows] == [["a", "c"], []] and rows[0]["scores"][0] > rows[0]["scores"][1]
    M.config = BertConfig(num_labels=1)
    assert Regression(M, None, None).rows(torch.tensor([[2.5], [-1.0]]), {}) == [{"value": 2.5}, {"value": -1.0}]
    M.config = BertConfig(id2label=names)
    r = SingleLabel(M, None, None).rows(torch.tensor([[0.0, 5.0, 0.0]]), {})
    assert r[0]["label"] == "b" and 0.98 < r[0]["score"] < 1.0


def test_parquet_glob_with_text_pairs_keeps_id_types(registry, tmp_path):
    """Two Parquet files through a glob, a text-pair column, int ids kept as ints; a row whose pair is empty is
    kept and counted; TSV output with --output-format."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.scoring import score

    for k in range(2):
        pq.write_table(pa.table({"n": [10 * k + i for i in range(5)], "a": texts(5),
                                 "b": ["so good", "", "meh", "bad", "fine"]}), tmp_path / f"p{k}.parquet")
    s = score(cfg(tmp_path, input=str(tmp_path / "p*.parquet"), text_column="a", text_pair_column="b",
                  id_columns=["n"], output=str(tmp_path / "out.tsv"), output_format="tsv"))
    assert s["rows_out"] == 10 and s["skipped"] == {"empty text": 2}
    lines = (tmp_path / "out.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:3] == ['"row"', '"n"', '"skipped"']
    assert [ln.split("\t")[1] for ln in lines[1:]] == ["0", "1", "2", "3", "4", "10", "11", "12", "13", "14"]


def test_multi_label_scores_at_the_models_own_threshold_unless_given(registry, tiny_model_dir, tmp_path, capsys):
    """A multi-label model trained with threshold 0.3 (config `finetune_threshold`, the logged model's metadata):
    `score` picks labels above 0.3, as `predict` does, and records 0.3 in the sidecar and the Parquet metadata;
    `--threshold 0.5` overrides it (and is recorded). The head answers fixed scores: sigmoid(2) = 0.88,
    sigmoid(-0.3) = 0.43, sigmoid(-3) = 0.05 for every text."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from flows.commands.predict import _score
    from tasks import registry as reg
    from tasks import tracking
    from tasks.predict import predict
    from tasks.scoring import META_KEY, score

    tags = tmp_path / "tags"
    m = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=3, id2label={0: "a", 1: "b", 2: "c"},
        label2id={"a": 0, "b": 1, "c": 2}, problem_type="multi_label_classification")
    with torch.no_grad():
        m.classifier.weight.zero_()
        m.classifier.bias.copy_(torch.tensor([2.0, -0.3, -3.0]))
    m.config.finetune_threshold = 0.3
    m.save_pretrained(tags)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tags)
    run = tracking.start_run("score-test", "tiny-tags", {})
    reg.register_model(tracking.log_model(run, str(tags), "text-classification"), "tiny-tags", run,
                       tags={"job": "classify"})
    tracking.end_run(run)

    write_csv(tmp_path / "in.csv", 6, extra={2: ""})
    s = score(cfg(tmp_path, registered_model="tiny-tags", version=1))
    t = pq.read_table(tmp_path / "out.parquet")
    assert t.column_names == ["row", "id", "skipped", "labels", "scores"]
    assert t.column("labels").to_pylist() == [["a", "b"]] * 2 + [None] + [["a", "b"]] * 3
    assert s["threshold"] == 0.3 and json.loads(t.schema.metadata[META_KEY])["threshold"] == 0.3
    assert json.loads((tmp_path / "out.parquet.meta.json").read_text())["threshold"] == 0.3
    [p] = predict("models:/tiny-tags/1", [texts(1)[0]])  # the same labels as `finetune predict`
    assert p["threshold"] == 0.3 and [c["label"] for c in p["labels"]] == ["a", "b"]

    # --threshold given: it wins, and is what the output records (through the CLI's own function)
    out = tmp_path / "given.parquet"
    assert _score(as_json=True, registered_model="tiny-tags", version=1, input=str(tmp_path / "in.csv"),
                  output=str(out), text_column="review", threshold=0.5, precision="fp32") == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == 0.5
    assert pq.read_table(out).column("labels").to_pylist() == [["a"]] * 2 + [None] + [["a"]] * 3
    assert json.loads(pq.read_table(out).schema.metadata[META_KEY])["threshold"] == 0.5


def test_length_batches_cap_texts_and_padded_tokens():
    from tasks.scoring import length_batches

    lengths = [5, 30, 12, 30, 8, 100, 7]
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])  # longest first, as the scorer sorts them
    # 100 tokens are past the budget: alone, not dropped; 3 x 30 > 64 tokens; the third batch stops at 3 texts
    assert list(length_batches(order, lengths, 3, 64)) == [[5], [1, 3], [2, 4, 6], [0]]
    assert list(length_batches(order, lengths, 64, 10_000)) == [order]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_scores_equal_one_text_at_a_time_for_every_family(family, family_model_dirs):
    """Length-sorted batches under a token budget, dynamically padded with the family's own pad token and side, give
    each text the prediction it gets alone (fp32): classification and fill-mask (asked with `[MASK]`)."""
    import numpy as np
    import pyarrow as pa
    from transformers import pipeline

    from tasks.scoring import Scorer, ScoreConfig

    words = [" ".join(["a great film about the sea"] * k) for k in (1, 9, 3, 20, 2, 6, 4)] + ["awful"]
    for task, texts, cols in (("text-classification", words, ("label", "score")),
                              ("fill-mask", [f"{t} [MASK] ." for t in words], ("tokens", "scores"))):
        pipe = pipeline(task, model=family_model_dirs[family], tokenizer=family_model_dirs[family], device="cpu")
        table = pa.table({"text": texts})
        got = {}
        for name, kw in (("alone", dict(batch_size=1)), ("batched", dict(batch_size=4, batch_tokens=120))):
            cfg = ScoreConfig(registered_model="x", input="in.csv", output="out.parquet", precision="fp32",
                              device="cpu", top_k=3, **kw)
            got[name] = Scorer(pipe, cfg).score(table).to_pydict()
        alone, batched = got["alone"], got["batched"]
        assert alone["skipped"] == batched["skipped"] == [None] * len(texts)
        label_col, score_col = cols
        assert batched[label_col] == alone[label_col], task
        for b, a in zip(batched[score_col], alone[score_col]):  # fill-mask: a list of top-k scores per mask
            np.testing.assert_allclose(np.array(b, dtype=float), np.array(a, dtype=float), atol=1e-5, err_msg=task)


def test_regression_evaluates_and_scores_in_fp32_other_kinds_in_the_run_precision(tiny_model_dir, monkeypatch):
    """The kind's EVAL_FP32, asked at both dispatch points: the recipe's evaluate hands the kind no autocast dtype
    for regression, the run's for the others; batch scoring at precision auto does the same."""
    import torch
    from transformers import AutoModelForSequenceClassification, pipeline

    import tasks.kinds.regression as regression
    import tasks.kinds.single_label as single_label
    from tasks.device import amp_dtype
    from tasks.jobs import classify
    from tasks.scoring import Scorer, ScoreConfig

    seen = {}
    for mod in (regression, single_label):
        monkeypatch.setattr(mod, "evaluate", lambda m, loader, device, dtype, desc, _n=mod.__name__:
                            seen.__setitem__(_n, dtype))
    for problem, kw in (("regression", dict(num_labels=1, problem_type="regression")), ("single", dict(num_labels=2))):
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, **kw)
        classify.evaluate(model, [], torch.device("cpu"), torch.bfloat16)
        pipe = pipeline("text-classification", model=model, tokenizer=tiny_model_dir, device="cpu")
        cfg = ScoreConfig(registered_model="x", input="in.csv", output="out.parquet", precision="auto", device="cpu")
        run_dtype = amp_dtype(torch.device("cpu"), "auto")  # bf16 where the CPU has it natively, else None
        assert Scorer(pipe, cfg).dtype == (None if problem == "regression" else run_dtype), problem
    assert seen == {regression.__name__: None, single_label.__name__: torch.bfloat16}
