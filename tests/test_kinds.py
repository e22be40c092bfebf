"""The kinds of classification (tasks/kinds/: multi-label, regression, sentence pairs, class weights) on data built
offline from the bundled reviews (tests/kinds_data.py), each through the flow -> registry -> predict -> pyfunc, on
a tiny config-built BERT. Tiny models on a few dozen reviews do not beat the floor reliably: these tests check the
plumbing (metrics, artifacts, the floor's numbers, what predict and pyfunc answer); the README's figures come
from the pretrained model."""
from __future__ import annotations

import json
import math
import os

import pytest

from flows.config import ClassifyConfig
from tasks.common import ConfigError

import kinds_data

flow_test = pytest.mark.usefixtures("prefect_harness")


def cfg_for(path, model, tmp_path, name, **over):
    raw = {
        "data": {"dataset": path, "text_column": "review", "max_length": 24, "eval_fraction": 0.25},
        "train": {"model": model, "freeze_embeddings": False, "dropout": None, "group_by_length": False, "epochs": 2,
                  "batch_size": 8, "learning_rate": 5e-3, "warmup_ratio": 0.0, "output_dir": str(tmp_path / "out")},
        "tracking": {"registered_model": name, "experiment": f"test-{name}"},
    }
    for k, v in over.items():
        raw.setdefault(k, {}).update(v) if isinstance(v, dict) else raw.__setitem__(k, v)
    return ClassifyConfig.model_validate(raw)


def history(run_id, key):
    from mlflow import MlflowClient

    return [m.value for m in MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_metric_history(run_id, key)]


def version_tags(name, version):
    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_model_version(name, version).tags


def check_hint_and_compare(out: dict, name: str, want: set[str], not_want: set[str]) -> None:
    """The summary's predict hint is `finetune predict` on a text of the run's own eval data, which predict answers
    in the kind's shape; `finetune compare` shows the kind's own metrics for every version (its narrow table too)."""
    import shlex

    from flows.manage import compare_rows, format_table
    from tasks.predict import predict

    words = shlex.split(out["predict_cmd"])
    assert words[:4] == ["finetune", "predict", "--registered-model", name] and ("--version" in words or
                                                                                 "--alias" in words)
    example = words[-1]
    assert example != "This movie was great!" and len(example.split()) >= 3  # the data's, not the default
    [answer] = predict(f"models:/{name}/{out['version']}", [example])
    assert {"labels", "value", "label"} & set(answer)
    rows = compare_rows(name)
    assert [r["version"] for r in rows] == list(range(len(rows), 0, -1))
    for r in rows:
        assert want <= set(r) and not (not_want & set(r)), r
    header = format_table(rows).splitlines()[0].split()
    assert "eval_loss" in header and (want & set(header)), header


@pytest.mark.slow
@flow_test
def test_multi_label_flow_registry_predict_pyfunc(tmp_path, tiny_model_dir, isolated):
    import mlflow
    from mlflow import MlflowClient

    from flows.classify import classify_flow
    from tasks.predict import format_predictions, predict

    csv = kinds_data.write_multilabel(tmp_path, 48)
    cfg = cfg_for(csv, tiny_model_dir, tmp_path, "tiny-tags", problem="multi_label", threshold=0.4,
                  data={"label_column": "tags", "label_separator": "|"})
    out = classify_flow(cfg)
    m = out["metrics"]
    assert set(m) >= {"eval_loss", "eval_f1", "eval_micro_f1", "eval_subset_accuracy"} and "eval_accuracy" not in m
    assert all(0.0 <= m[k] <= 1.0 for k in ("eval_f1", "eval_micro_f1", "eval_subset_accuracy"))
    assert len(history(out["run_id"], "eval_micro_f1")) == 2
    # the floor: the majority label set, by macro-F1 (the default promotion metric)
    promo = out["promotion"]
    assert promo["metric"] == "f1" and promo["baseline"] == "majority-label-set"
    assert set(promo["baseline_scores"]) == {"f1", "micro_f1", "subset_accuracy", "loss"}
    # every text has 2 of 4 tags: predicting one fixed pair of tags gets half of the tags of the others right
    assert 0.0 < promo["baseline_scores"]["micro_f1"] < 1.0
    arts = {a.path for a in MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).list_artifacts(out["run_id"], "eval")}
    assert "eval/per_label_f1.json" in arts and "eval/confusion_matrix.json" not in arts
    # predict: every label above the recorded threshold, highest first; pyfunc returns every label's score
    res = predict(f"models:/tiny-tags/{out['version']}", ["a great film", "awful"])
    assert all(r["threshold"] == 0.4 for r in res)
    for r in res:
        scores = [c["score"] for c in r["labels"]]
        assert scores == sorted(scores, reverse=True) and all(s > 0.4 for s in scores)
        assert {c["label"] for c in r["labels"]} <= {"imdb", "rotten_tomatoes", "positive", "negative"}
    assert "\ta great film" in format_predictions(res)
    df = mlflow.pyfunc.load_model(f"models:/tiny-tags/{out['version']}").predict(["a great film"])
    cells = [c for c in df.iloc[0].tolist() if isinstance(c, dict)]
    assert sorted(c["label"] for c in cells) == ["imdb", "negative", "positive", "rotten_tomatoes"]
    assert all(0.0 <= c["score"] <= 1.0 for c in cells)
    got = {c["label"] for c in res[0]["labels"]}
    assert got == {c["label"] for c in cells if c["score"] > 0.4}

    # a JSON list column, the Trainer engine, pos_weight from the train split's counts (logged), LoRA
    jsonl = kinds_data.write_multilabel(tmp_path, 48, as_json=True)
    cfg2 = cfg_for(jsonl, tiny_model_dir, tmp_path, "tiny-tags", problem="multi_label", engine="trainer",
                   class_weights="balanced", peft="lora", data={"label_column": "tags"},
                   train={"learning_rate": 1e-2})
    out2 = classify_flow(cfg2)
    assert out2["version"] == "2" and set(out2["metrics"]) >= {"eval_micro_f1", "eval_subset_accuracy"}
    run_arts = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).download_artifacts(out2["run_id"],
                                                                                    "eval/class_weights.json")
    weights = json.loads(open(run_arts).read())["pos_weight"]
    assert set(weights) == {"imdb", "negative", "positive", "rotten_tomatoes"}
    assert all(w == pytest.approx(1.0, abs=0.5) for w in weights.values())  # half the texts carry each tag
    res2 = predict(f"models:/tiny-tags/2", ["a great film"])
    assert res2[0]["threshold"] == 0.5 and isinstance(res2[0]["labels"], list)
    check_hint_and_compare(out2, "tiny-tags", want={"eval_f1", "eval_micro_f1", "eval_subset_accuracy"},
                           not_want={"eval_accuracy", "eval_rmse"})


@pytest.mark.slow
@flow_test
def test_regression_flow_registry_predict_pyfunc(tmp_path, tiny_model_dir, isolated):
    import mlflow

    from flows.classify import classify_flow
    from tasks.predict import format_predictions, predict

    csv = kinds_data.write_regression(tmp_path, 48)
    # the Trainer engine; best-epoch selection and early stopping by RMSE (lower is better)
    cfg = cfg_for(csv, tiny_model_dir, tmp_path, "tiny-score", problem="regression", engine="trainer",
                  data={"label_column": "score"}, train={"epochs": 3, "early_stopping_patience": 1})
    out = classify_flow(cfg)
    m = out["metrics"]
    assert set(m) >= {"eval_loss", "eval_rmse", "eval_mae", "eval_pearson", "eval_spearman"}
    assert m["eval_rmse"] == pytest.approx(math.sqrt(m["eval_loss"]), rel=1e-4)
    rmse = history(out["run_id"], "eval_rmse")
    assert out["selected_epoch"] == 1 + rmse.index(min(rmse))  # the best epoch by RMSE, lower is better
    promo = out["promotion"]
    assert promo["metric"] == "rmse" and promo["baseline"] == "predict-the-mean"
    base = promo["baseline_scores"]
    assert base["pearson"] == 0.0 and base["rmse"] == pytest.approx(math.sqrt(base["loss"]))
    # the floor decides by RMSE, lower is better: promoted exactly when the model's RMSE is below the mean's
    assert out["promotion"]["qualified"] == (m["eval_rmse"] < base["rmse"])
    # predict returns the number; pyfunc the same number as the score
    res = predict(f"models:/tiny-score/{out['version']}", ["a great film", "awful"])
    assert all(isinstance(r["value"], float) and math.isfinite(r["value"]) and r["label"] == "score" for r in res)
    assert format_predictions(res).splitlines()[0] == f"{res[0]['value']:.4f}\ta great film"
    df = mlflow.pyfunc.load_model(f"models:/tiny-score/{out['version']}").predict(["a great film"])
    assert df.iloc[0]["score"] == pytest.approx(res[0]["value"], abs=1e-5)
    with pytest.raises(ConfigError, match="single texts, not pairs"):  # its pyfunc would drop the second text
        predict(f"models:/tiny-score/{out['version']}", ["a great film ||| loved it"])

    # the plain loop
    cfg2 = cfg_for(csv, tiny_model_dir, tmp_path, "tiny-score", problem="regression", data={"label_column": "score"})
    out2 = classify_flow(cfg2)
    assert set(out2["metrics"]) >= {"eval_rmse", "eval_pearson"} and len(history(out2["run_id"], "eval_rmse")) == 2
    check_hint_and_compare(out2, "tiny-score", want={"eval_rmse", "eval_mae", "eval_pearson", "eval_spearman"},
                           not_want={"eval_accuracy", "eval_micro_f1"})


@pytest.mark.slow
def test_regression_resumes_from_its_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    """The core's plain loop on a regression spec: a run stopped after epoch 1 resumes from its checkpoint and
    trains epoch 2 only."""
    from tasks.data import prepare_dataset
    from tasks.training import train

    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    csv = kinds_data.write_regression(tmp_path, 24)
    cfg = cfg_for(csv, tiny_model_dir, tmp_path, "r", problem="regression", data={"label_column": "score"},
                  train={"epochs": 2})
    data = prepare_dataset(cfg.data, 0, None, "regression")
    spec = cfg.spec(data.label_names)
    tokenized = cfg.recipe.tokenize(data.path, tiny_model_dir, spec)
    first = spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": 1})})
    train(first, tokenized, str(tmp_path / "cut"))
    again = spec.model_copy(update={"train": spec.train.model_copy(update={"resume": True})})
    resumed = train(again, tokenized, str(tmp_path / "cut"))
    assert resumed.resumed_from and [r["epoch"] for r in resumed.history] == [1, 2]
    assert math.isfinite(resumed.final["eval_rmse"]) and resumed.selection_metric == "eval_rmse"


@pytest.mark.slow
@flow_test
def test_sentence_pair_flow_with_class_weights(tmp_path, tiny_model_dir, isolated):
    import mlflow
    from mlflow import MlflowClient

    from flows.classify import classify_flow
    from tasks.predict import predict

    csv = kinds_data.write_pairs(tmp_path, 48)
    cfg = cfg_for(csv, tiny_model_dir, tmp_path, "tiny-pairs", data={"text_column": "first",
                  "text_pair_column": "second", "label_column": "relation"},
                  class_weights='{"same": 2.0}')
    out = classify_flow(cfg)
    assert set(out["metrics"]) >= {"eval_accuracy", "eval_f1"}
    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    weights = json.loads(open(c.download_artifacts(out["run_id"], "eval/class_weights.json")).read())
    assert weights == {"different": 1.0, "same": 2.0}
    assert "eval/per_class_f1.json" in {a.path for a in c.list_artifacts(out["run_id"], "eval")}
    uri = f"models:/tiny-pairs/{out['version']}"
    res = predict(uri, ["the acting was fine ||| and the plot was fine too", "one text alone"])
    assert [r["label"] in ("same", "different") for r in res] == [True, True]
    # pyfunc takes the pair as MLflow's {text, text_pair} (the logged signature says so; without it MLflow would
    # drop the second text): same answer as predict's `A ||| B`, another than the first text's alone
    from mlflow.models import get_model_info

    info = get_model_info(uri)
    assert info.metadata["text_pair"] is True and info.signature.inputs.input_names() == ["text", "text_pair"]
    pf = mlflow.pyfunc.load_model(uri)
    df = pf.predict([{"text": "the acting was fine", "text_pair": "and the plot was fine too"}])
    assert df.iloc[0]["label"] == res[0]["label"] and df.iloc[0]["score"] == pytest.approx(res[0]["score"], abs=1e-5)
    alone = pf.predict([{"text": "the acting was fine"}])
    assert alone.iloc[0]["score"] != pytest.approx(df.iloc[0]["score"], abs=1e-7)

    # the Trainer engine with balanced weights (weighted cross-entropy through its compute_loss)
    out2 = classify_flow(cfg_for(csv, tiny_model_dir, tmp_path, "tiny-pairs", engine="trainer",
                                 class_weights="balanced", data={"text_column": "first",
                                 "text_pair_column": "second", "label_column": "relation"}))
    w2 = json.loads(open(c.download_artifacts(out2["run_id"], "eval/class_weights.json")).read())
    assert set(w2) == {"different", "same"} and all(0.5 < v < 2.0 for v in w2.values())
    assert " ||| " in out2["predict_cmd"]  # the hint is a pair of the run's own eval texts
    check_hint_and_compare(out2, "tiny-pairs", want={"eval_accuracy", "eval_f1"},
                           not_want={"eval_micro_f1", "eval_rmse"})


# --- plain functions: no Prefect, no training -------------------------------------------------------------------

def test_pair_tokenization_truncates_the_longer_text_first(tmp_path, tiny_model_dir, monkeypatch):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from tasks.data import DataConfig, prepare_dataset
    from tasks.tokenize import tokenize_dataset

    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    import csv

    p = tmp_path / "p.csv"
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "y"])
        for i in range(8):
            w.writerow(["short one", " ".join(["long"] * 50), "yes" if i % 2 else "no"])
    data = prepare_dataset(DataConfig(dataset=str(p), text_column="a", text_pair_column="b", label_column="y",
                                      max_length=16), 0)
    row = load_from_disk(tokenize_dataset(data.path, tiny_model_dir, 16))["train"][0]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(row["input_ids"]) == 16 and sum(row["token_type_ids"]) > 0  # two segments
    first, second = tok.decode(row["input_ids"], skip_special_tokens=False).split("[SEP]")[:2]
    assert "short one" in first and second.split().count("long") == 16 - 3 - 2  # only the long side lost tokens


def test_bad_input_is_a_config_error_before_prefect(tmp_path, tiny_model_dir, monkeypatch):
    """Each problem is a ConfigError from the CLI's checks (build_config, precheck), before any flow runs."""
    from flows import train
    from flows.config import build_config

    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    import csv

    def write(name, header, rows):
        p = tmp_path / name
        with p.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
        return str(p)

    def problem(path, **over):
        base = {"data": {"dataset": path, "text_column": "review", "label_column": "y", "max_length": 16},
                "train": {"model": tiny_model_dir, "output_dir": str(tmp_path / "out")}}
        for k, v in over.items():
            base.setdefault(k, {}).update(v) if isinstance(v, dict) else base.__setitem__(k, v)
        with pytest.raises(ConfigError) as e:
            train.precheck(build_config(ClassifyConfig, None, base))
        return str(e.value)

    numbers = write("n.csv", ["review", "y"], [("good", "4.5"), ("bad", "high"), ("ok", "3")])
    assert "'high' in row 1" in problem(numbers, problem="regression") and "not a number" in problem(numbers, problem="regression")
    tags = write("t.csv", ["review", "y"], [("good", "a|b"), ("bad", "|"), ("ok", "b")])
    assert "empty label set" in problem(tags, problem="multi_label", data={"label_separator": "|"})
    assert "--label-separator" in problem(tags, problem="multi_label")
    classes = write("c.csv", ["review", "y"], [("good", "pos"), ("bad", "neg")] * 4)
    assert "--text-pair-column" in problem(classes, data={"text_pair_column": "second"})
    assert "threshold" in problem(classes, problem="multi_label", threshold=1.0)
    assert "not in the data" in problem(classes, class_weights='{"pos": 2, "positive": 1}')
    assert "JSON object" in problem(classes, class_weights="heavy")
    assert "class weights apply to single_label and multi_label" in problem(numbers, problem="regression",
                                                                            class_weights="balanced")
    assert "does not apply" in problem(numbers, problem="regression", tracking={"promotion_metric": "accuracy"})


def test_floors_of_each_kind(tmp_path):
    """The majority label set and predict-the-mean, on hand-made eval splits."""
    from datasets import Dataset, DatasetDict, List, Value

    from tasks.jobs import JobSpec
    from tasks.kinds import multi_label, regression

    ml = tmp_path / "ml"
    rows = [[1.0, 0.0, 1.0]] * 3 + [[0.0, 1.0, 0.0]] * 2
    DatasetDict({"eval": Dataset.from_dict({"label": rows}, features=None).cast_column(
        "label", List(Value("float32")))}).save_to_disk(str(ml))
    spec = JobSpec(job="classify", options={"problem": "multi_label"}, label_names=["a", "b", "c"])
    b = multi_label.baseline(str(ml), [], spec)
    assert b["subset_accuracy"] == pytest.approx(0.6)  # {a, c} on 3 of 5
    assert b["micro_f1"] == pytest.approx(2 * 6 / (2 * 6 + 4 + 2))  # tp 6, fp 4, fn 2
    rg = tmp_path / "rg"
    DatasetDict({"eval": Dataset.from_dict({"label": [1.0, 2.0, 3.0, 6.0]})}).save_to_disk(str(rg))
    r = regression.baseline(str(rg), [], JobSpec(job="classify", options={"problem": "regression"}))
    assert r["rmse"] == pytest.approx(math.sqrt(((2) ** 2 + 1 + 0 + 9) / 4)) and r["pearson"] == 0.0


def test_promotion_metric_and_direction_per_kind():
    from tasks.jobs import JobSpec, baseline_name_of, resolve_metric

    assert resolve_metric("classify") == "f1"
    assert resolve_metric("classify", None, {"problem": "regression"}) == "rmse"
    assert resolve_metric("classify", "micro-f1", {"problem": "multi_label"}) == "micro_f1"
    assert JobSpec(job="classify", options={"problem": "regression"}).selection_metric == ("eval_rmse", False)
    assert JobSpec(job="classify", options={"problem": "regression"},
                   promotion_metric="spearman").selection_metric == ("eval_spearman", True)
    assert baseline_name_of("classify", {"problem": "regression"}) == "predict-the-mean"
    assert baseline_name_of("classify", {}) == "majority-class"
    with pytest.raises(ConfigError):
        resolve_metric("classify", "rmse", {"problem": "single_label"})


def test_cli_bad_regression_label_is_one_error_line_before_prefect(tmp_path, tiny_model_dir):
    from test_errors import PREFECT_STARTED, finetune, one_error_line

    p = tmp_path / "scores.csv"
    p.write_text("review,score\ngood film,4.5\nbad film,high\nfine,3\n")
    r = finetune(tmp_path, "classify", "--problem", "regression", "--dataset", str(p), "--text-column", "review",
                 "--label-column", "score", "--model", tiny_model_dir, "--max-length", "16",
                 "--output-dir", str(tmp_path / "out"))
    line = one_error_line(r)
    assert "'high' in row 1" in line and "not a number" in line
    assert PREFECT_STARTED not in r.stdout + r.stderr


def test_regression_head_starts_at_the_train_mean(tmp_path, tiny_model_dir, monkeypatch):
    import torch

    from tasks.data import prepare_dataset
    from tasks.training import model_for_training

    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    csv = kinds_data.write_regression(tmp_path, 24)
    cfg = cfg_for(csv, tiny_model_dir, tmp_path, "r", problem="regression", data={"label_column": "score"})
    data = prepare_dataset(cfg.data, 0, None, "regression")
    spec = cfg.spec(data.label_names)
    tokenized = cfg.recipe.tokenize(data.path, tiny_model_dir, spec)
    model, _ = model_for_training(spec, tokenized, torch.device("cpu"))
    from datasets import load_from_disk

    mean = sum(load_from_disk(tokenized)["train"]["labels"]) / data.num_train
    assert model.classifier.bias.item() == pytest.approx(mean, rel=1e-5)


def _tiny_head(problem_type: str | None, num_labels: int):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, num_labels=num_labels, problem_type=problem_type)
    return BertForSequenceClassification(cfg).eval()


def _batches(labels_of, sizes=(4, 4, 2), length: int = 6):
    import torch

    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(5, 60, (n, length), generator=g),
             "attention_mask": torch.ones(n, length, dtype=torch.long), "labels": labels_of(n, g)} for n in sizes]


def test_one_weighted_loss_for_single_and_multi_label():
    """`tasks.kinds.weighted_loss` is both kinds' loss: weighted cross-entropy (class weights) and BCE (pos_weight)
    on the fp32 logits, weights in label_names order; all-ones weights give the model's own loss; no weights, no
    loss of its own."""
    import torch
    import torch.nn.functional as F

    from tasks.jobs import JobSpec
    from tasks.kinds import multi_label, single_label

    names = ["a", "b", "c"]
    [single] = _batches(lambda n, g: torch.randint(0, 3, (n,), generator=g), sizes=(5,))
    [multi] = _batches(lambda n, g: torch.randint(0, 2, (n, 3), generator=g).float(), sizes=(5,))
    for kind, model, batch, reference, weight_key in (
            (single_label, _tiny_head(None, 3), single,
             lambda lg, y, w: F.cross_entropy(lg, y, weight=w), "weight"),
            (multi_label, _tiny_head("multi_label_classification", 3), multi,
             lambda lg, y, w: F.binary_cross_entropy_with_logits(lg, y, pos_weight=w), "pos_weight")):
        spec = JobSpec(job="classify", options={"problem": kind.__name__.rsplit(".", 1)[1],
                                                "class_weights": '{"b": 3.0, "c": 0.5}'}, label_names=names)
        loss = kind.loss_for(spec)
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            value, out = loss(model, batch, return_outputs=True)
            want = reference(logits, batch["labels"], torch.tensor([1.0, 3.0, 0.5]))
            assert value.item() == pytest.approx(want.item(), rel=1e-6), weight_key
            assert torch.equal(out.logits, logits)
            ones = spec.model_copy(update={"options": {**spec.options, "class_weights": '{"a": 1, "b": 1, "c": 1}'}})
            assert kind.loss_for(ones)(model, batch).item() == pytest.approx(model(**batch).loss.item(), rel=1e-6)
        assert kind.loss_for(spec.model_copy(update={"options": {"problem": spec.options["problem"]}})) is None


def test_one_evaluation_loop_for_every_kind():
    """Each kind evaluates through `tasks.evaluate.eval_loop`: the loss is the mean over examples of the model's
    own batch losses (batches of 4, 4 and 2), the predictions those of the logits, and the model comes back in the
    mode it went in."""
    import torch

    from tasks.kinds import multi_label, regression, single_label

    cpu = torch.device("cpu")
    cases = [
        (single_label, _tiny_head(None, 3), lambda n, g: torch.randint(0, 3, (n,), generator=g), "eval_loss"),
        (multi_label, _tiny_head("multi_label_classification", 3),
         lambda n, g: torch.randint(0, 2, (n, 3), generator=g).float(), "eval_loss"),
        (regression, _tiny_head("regression", 1), lambda n, g: torch.rand(n, generator=g) * 4 + 1, "eval_loss"),
    ]
    for kind, model, labels_of, key in cases:
        batches = _batches(labels_of)
        with torch.no_grad():
            outs = [model(**b) for b in batches]
        want_loss = sum(o.loss.item() * len(b["labels"]) for o, b in zip(outs, batches)) / 10
        logits = torch.cat([o.logits for o in outs])
        for training in (True, False):
            model.train(training)
            r = kind.evaluate(model, batches, cpu)
            assert model.training is training, kind.__name__
        assert r[key] == pytest.approx(want_loss, rel=1e-5), kind.__name__
        if kind is single_label:
            assert r["preds"] == logits.argmax(-1).tolist()
        elif kind is multi_label:
            assert r["preds"] == (logits.sigmoid() > 0.5).int().tolist()
            assert r["labels"] == torch.cat([b["labels"] for b in batches]).int().tolist()
        else:
            assert r["preds"] == pytest.approx(logits[:, 0].tolist(), rel=1e-5)
            assert r["eval_rmse"] == pytest.approx(math.sqrt(r["eval_loss"]))


@pytest.mark.slow
@pytest.mark.parametrize("problem,engine", [("multi_label", "manual"), ("regression", "trainer")])
def test_kinds_under_two_gloo_processes_match_one_process_evaluation(problem, engine, tmp_path, tiny_model_dir,
                                                                    monkeypatch):
    """Data-parallel training of each kind: `train` with nproc_per_node 2 runs as torchrun's 2 CPU processes on
    gloo (multi-label on the plain loop with pos_weight, the weighted loss inside DDP; regression on the HF
    Trainer, float labels, its head started at the train mean); the run's final metrics (rank 0's evaluation) equal
    a 1-process evaluation of the saved model on the same eval set."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from tasks import kinds
    from tasks.data import prepare_dataset
    from tasks.training import build_loaders, train

    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    if problem == "multi_label":
        path = kinds_data.write_multilabel(tmp_path, 40)
        over = dict(threshold=0.45, class_weights='{"imdb": 2.0, "positive": 0.5}',
                    data={"label_column": "tags", "label_separator": "|"})
    else:
        path = kinds_data.write_regression(tmp_path, 40)
        over = dict(data={"label_column": "score"})
    cfg = cfg_for(path, tiny_model_dir, tmp_path, "ddp", problem=problem, engine=engine,
                  train={"nproc_per_node": 2, "batch_size": 4, "precision": "fp32"}, **over)
    data = prepare_dataset(cfg.data, 0, None, problem)
    spec = cfg.recipe.resolve_spec(cfg.spec(data.label_names), data.path)
    tokenized = cfg.recipe.tokenize(data.path, tiny_model_dir, spec)
    run = tmp_path / "run"
    res = train(spec, tokenized, str(run))

    assert json.loads((run / "distributed" / "command.json").read_text())["command"][1:5] == [
        "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    assert [r["epoch"] for r in res.history] == [1, 2] and res.final
    assert res.steps_per_epoch == 4  # 30 training rows, 15 per rank in batches of 4 (one process: 8 steps)
    model = AutoModelForSequenceClassification.from_pretrained(res.model_dir)
    one = spec.recipe.evaluate(model, build_loaders(tokenized, spec)["eval"], torch.device("cpu"))
    metrics = kinds.of_spec(spec).METRICS
    assert set(metrics) <= set(res.final) and set(metrics) <= set(one)
    for key in metrics:
        assert math.isclose(res.final[key], one[key], rel_tol=1e-4, abs_tol=1e-5), (key, res.final, one)
    extras = json.loads((run / "eval_extras.json").read_text())  # rank 0's predictions, for the artifacts
    want = one["preds"]
    assert extras["preds"] == (want if problem == "multi_label" else pytest.approx(want, abs=1e-5))
