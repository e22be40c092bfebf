"""A registered model as the starting point (tasks/base_model.py, flows/train.py: starting_point): `models:/`
URIs resolved once and cached by name and version, a tiny mlm version as the base of classify (lineage recorded,
head new), warm start from the job's own champion (labels must match)."""
from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import ClassifyConfig


def register_tiny(model_dir: str, name: str, hf_task: str, alias: str | None = "champion") -> str:
    """Logs `model_dir` under a fresh run with MLflow's transformers flavor and registers it; returns the version."""
    from tasks import registry, tracking

    run_id = tracking.start_run("test-bases", "base", {"job": "setup"})
    uri = tracking.log_model(run_id, model_dir, hf_task)
    version = registry.register_model(uri, name, run_id)
    tracking.end_run(run_id)
    if alias:
        registry.set_alias(name, alias, version)
    return version


def classify_cfg(csv: str, model: str, tmp_path, **top) -> ClassifyConfig:
    return ClassifyConfig.model_validate({
        "data": {"dataset": csv, "text_column": "review", "label_column": "sentiment", "max_length": 16,
                 "eval_fraction": 0.25},
        "train": {"model": model, "epochs": 1, "batch_size": 16, "learning_rate": 1e-2, "warmup_ratio": 0.0,
                  "group_by_length": False, "output_dir": str(tmp_path / "out")},
        "tracking": {"registered_model": "tiny-sentiment", "experiment": "test-bases"},
        **top,
    })


def test_parse_rejects_what_is_not_a_registry_uri():
    from tasks.base_model import parse
    from tasks.common import ConfigError

    assert parse("models:/imdb-fill-mask@champion") == ("imdb-fill-mask", "champion", None)
    assert parse("models:/imdb-fill-mask/3") == ("imdb-fill-mask", None, "3")
    with pytest.raises(ConfigError, match="models:/NAME@ALIAS"):
        parse("models:/imdb-fill-mask")


def test_version_resolved_once_and_cached(isolated, tiny_model_dir, monkeypatch):
    """An alias is pinned to its version; the version is downloaded once into the cache (a second resolution,
    even in a fresh process with the alias moved, does not download again), and the dir loads with its tokenizer."""
    import mlflow
    from transformers import AutoConfig, AutoTokenizer

    from tasks import registry
    from tasks.base_model import cache_dir, local_dir, pin
    from tasks.base_model import resolve_model
    from tasks.common import ConfigError

    v = register_tiny(tiny_model_dir, "tiny-mlm", "fill-mask")
    ref = pin("models:/tiny-mlm@champion")
    assert (ref.name, ref.version, ref.requested, ref.uri) == ("tiny-mlm", v, "models:/tiny-mlm@champion",
                                                               f"models:/tiny-mlm/{v}")
    assert ref.run_id and ref.model_id and ref.model_id.startswith("m-")

    calls = []
    real = mlflow.artifacts.download_artifacts
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", lambda *a, **k: calls.append(k) or real(*a, **k))
    path = local_dir(ref.uri, ref)
    assert path == str(cache_dir("tiny-mlm", v)) and len(calls) == 1
    assert AutoConfig.from_pretrained(path).hidden_size == 32
    assert AutoTokenizer.from_pretrained(path).mask_token == "[MASK]"
    # a second resolution (pinned or by alias, and what every task calls) reuses the cache
    v2 = register_tiny(tiny_model_dir, "tiny-mlm", "fill-mask", alias=None)
    assert resolve_model(ref.uri) == path and local_dir(ref.uri, ref) == path and len(calls) == 1
    registry.set_alias("tiny-mlm", "champion", v2)  # moved after the pin: the pinned ref is unchanged
    assert ref.version == v and resolve_model(ref.uri) == path and len(calls) == 1

    with pytest.raises(ConfigError, match="no alias 'nope'"):
        pin("models:/tiny-mlm@nope")
    with pytest.raises(ConfigError, match="no version 99"):
        pin("models:/tiny-mlm/99")


def test_architecture_that_cannot_do_the_job_is_one_error(tmp_path):
    from transformers import GPT2Config

    from tasks.base_model import check_fits
    from tasks.common import ConfigError

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    check_fits(str(tmp_path), "text-classification", "models:/gpt/1")  # GPT-2 has a sequence-classification class
    with pytest.raises(ConfigError, match="cannot be trained for fill-mask"):
        check_fits(str(tmp_path), "fill-mask", "models:/gpt/1")


def test_labels_must_match_by_name_and_order(tmp_path):
    from transformers import BertConfig

    from tasks.base_model import check_labels
    from tasks.common import ConfigError

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
               architectures=["BertForSequenceClassification"],
               id2label={0: "negative", 1: "positive"}).save_pretrained(tmp_path)
    check_labels(str(tmp_path), ["negative", "positive"], "m")
    with pytest.raises(ConfigError, match="another order"):
        check_labels(str(tmp_path), ["positive", "negative"], "m")
    with pytest.raises(ConfigError, match=r"only in the model: \['negative'\]; only in the data: \['bad'\]"):
        check_labels(str(tmp_path), ["bad", "positive"], "m")


@pytest.mark.usefixtures("prefect_harness")
def test_mlm_version_as_classify_base_then_warm_start(isolated, tiny_model_dir, sentiment_csv, tmp_path, capsys):
    """classify from a tiny mlm version: encoder carried over, classifier head new, lineage recorded both ways;
    then a retraining warm-started from that classifier's champion (head carried over), and the one-line error
    when the labels differ."""
    from flows.classify import classify_flow
    from flows.train import precheck
    from tasks import tracking
    from tasks.common import ConfigError

    v = register_tiny(tiny_model_dir, "tiny-mlm", "fill-mask")
    cfg = classify_cfg(sentiment_csv, "models:/tiny-mlm@champion", tmp_path)
    precheck(cfg)  # models:/ is not a Hub id: the precheck resolves and checks it
    out = classify_flow(cfg)

    c = tracking.client()
    run = c.get_run(out["run_id"])
    p, tags = run.data.params, run.data.tags
    assert p["train.model"] == f"models:/tiny-mlm/{v}"  # trained from the pinned version
    assert (p["base.registered_model"], p["base.version"], p["base.model_uri"]) == ("tiny-mlm", v,
                                                                                   "models:/tiny-mlm@champion")
    base_run = c.get_model_version("tiny-mlm", v).run_id
    assert p["base.run_id"] == base_run and tags["finetune.base_run_id"] == base_run
    new = p["base.new_weights"].split(",")
    assert any(n.startswith("classifier.") for n in new) and not any("encoder" in n for n in new)
    # MLflow's model lineage: the version's logged model is an input of the run; the base run links back
    assert [m.model_id for m in run.inputs.model_inputs] == [p["base.model_id"]]
    assert out["run_id"] in c.get_run(base_run).data.tags["finetune.derived_run_ids"].split(",")
    assert "started from           base models:/tiny-mlm/" in capsys.readouterr().out

    # warm start: the classifier's own champion, same labels (made champion by hand: 3 steps learn little)
    from tasks import registry

    registry.set_alias("tiny-sentiment", "champion", out["version"])
    ws = classify_flow(classify_cfg(sentiment_csv, "bundled-minilm", tmp_path, warm_start="champion"))
    wp = c.get_run(ws["run_id"]).data.params
    assert wp["base.registered_model"] == "tiny-sentiment" and wp["base.version"] == out["version"]
    assert wp["base.new_weights"] == "none" and wp["warm_start"] == "champion"

    # different labels: one line naming the difference (the data's labels are known after loading)
    bad = tmp_path / "other.csv"
    bad.write_text("review,sentiment\n" + "".join(f"text {i},{['good', 'bad'][i % 2]}\n" for i in range(24)))
    bad_cfg = classify_cfg(str(bad), "bundled-minilm", tmp_path, warm_start="champion")
    with pytest.raises(ConfigError, match=r"other labels: labels \['negative', 'positive'\] vs the data's"):
        precheck(bad_cfg)  # before Prefect (the CLI's path)
    with pytest.raises(ConfigError, match=r"other labels: labels \['negative', 'positive'\] vs the data's"):
        classify_flow(bad_cfg)  # and in the flow (a deployment's run)


def test_warm_start_without_a_champion_starts_from_train_model(isolated, tiny_model_dir, sentiment_csv, tmp_path):
    from flows.train import starting_point

    cfg = classify_cfg(sentiment_csv, tiny_model_dir, tmp_path, warm_start="champion")
    pinned, ref, note = starting_point(cfg)
    assert ref is None and pinned.train.model == tiny_model_dir and "has no champion yet" in note


def test_lora_version_loads_merged_onto_its_base(isolated, tiny_model_dir, tmp_path):
    """A LoRA-logged version (adapter + reference to its base) becomes a plain checkpoint: base + adapter merged,
    the same outputs as the adapter model; without its base on this machine, one line naming the path."""
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tasks import adapters, registry, tracking
    from tasks.base_model import local_dir, pin
    from tasks.common import ConfigError
    from tasks.training import mark_new_weights

    torch.manual_seed(0)
    # as the recipes load it: the new-weights record says what LoRA must save whole (a new classifier and pooler)
    base, info = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2,
                                                                    output_loading_info=True)
    model = adapters.apply_lora(mark_new_weights(base, info), r=2, alpha=4, dropout=0.0)
    for n, p in model.named_parameters():  # a trained-looking adapter: B is zero-initialised
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    adapters.save_model(model, tok, tmp_path / "lora")
    run_id = tracking.start_run("test-bases", "lora", {})
    version = registry.register_model(adapters.log_model(run_id, tmp_path / "lora", "text-classification"),
                                      "tiny-lora", run_id)
    path = local_dir(f"models:/tiny-lora/{version}")
    merged = AutoModelForSequenceClassification.from_pretrained(path).eval()
    x = tok(["a great film"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**x).logits, model.eval()(**x).logits, atol=1e-5)

    # the base dir the version was logged with, moved away: one line; no half-written cache entry is left
    shutil.rmtree(path)
    shutil.move(tracking.STORE_DIR / "lora-bases", tmp_path / "moved")
    with pytest.raises(ConfigError, match="LoRA adapter whose base .* is not on this machine"):
        local_dir(f"models:/tiny-lora/{version}", pin(f"models:/tiny-lora/{version}"))
    assert sorted(p.name for p in Path(path).parent.iterdir()) == []


def test_unknown_registry_base_is_one_error_line_before_prefect(tmp_path):
    """`finetune classify --model models:/...` with no such model: exit 2, one `error:` line, no traceback, and
    Prefect's temporary server never started (the precheck treats models:/ as a registry URI, not a Hub id)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_"))}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", FINETUNE_CACHE_DIR=str(tmp_path / "cache"),
               FINETUNE_MLFLOW_STORE=str(tmp_path / "store"), HF_HUB_OFFLINE="1", PYTHONPATH=str(root))
    p = subprocess.run([sys.executable, "-m", "flows.cli", "classify", "--model", "models:/nope@champion"],
                       capture_output=True, text=True, env=env, cwd=root, timeout=300)
    out = p.stdout + p.stderr
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert "registered model 'nope' has no alias 'champion'" in errors[0]
    assert "Starting temporary server" not in out
