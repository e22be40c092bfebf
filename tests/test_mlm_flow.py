"""The masked-LM flow under the Prefect test harness with MLflow on sqlite in tmp_path: params, per-epoch metrics
(epoch 0 included), the registered fill-mask version; then the plain-loop engine on the same data."""
from __future__ import annotations

import pytest

from flows.config import MLMConfig

CORPUS = ["this is a great movie !", "the cat sat on the mat ."]


def _cfg(model: str, corpus: str, out: str, engine: str, epochs: int) -> MLMConfig:
    return MLMConfig(
        engine=engine,
        group_texts=False,
        data={"dataset": corpus, "max_length": 16, "eval_fraction": 0.2, "eval_samples": 40},
        train={"model": model, "epochs": epochs, "batch_size": 16, "learning_rate": 1e-2, "output_dir": out, "seed": 0},
        tracking={"registered_model": "tiny-mlm"},
    )


def test_mlm_flow_tracks_and_registers(prefect_harness, isolated, tiny_model_dir, capsys):
    from flows.mlm import mlm_flow
    from tasks import tracking
    from tasks.predict import model_task

    corpus = isolated / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 100) + "\n")
    out = mlm_flow(_cfg(tiny_model_dir, str(corpus), str(isolated / "out"), "sft", 2))

    c = tracking.client()
    run = c.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["job"] == "mlm" and p["engine"] == "sft" and p["mlm_probability"] == "0.15" and p["group_texts"] == "False"
    assert p["train.learning_rate"] == "0.01" and p["data.max_length"] == "16"
    assert int(p["data.train_blocks"]) == 160 and int(p["data.eval_masked_tokens"]) > 0
    assert run.data.tags["mlm_head"] == "pretrained"

    steps = {k: sorted(m.step for m in c.get_metric_history(out["run_id"], k)) for k in ("train_loss", "eval_loss", "perplexity", "eval_masked_accuracy")}
    assert steps == {"train_loss": [1, 2], "eval_loss": [0, 1, 2], "perplexity": [0, 1, 2], "eval_masked_accuracy": [0, 1, 2]}
    assert not any("token_accuracy" in k or "entropy" in k for k in run.data.metrics)
    loss = {m.step: m.value for m in c.get_metric_history(out["run_id"], "eval_loss")}
    assert loss[2] < loss[0]
    assert run.data.metrics["train_samples_per_second"] > 0

    assert out["version"] == "1" and "champion" in out["aliases"]
    # One evaluation per job: the promotion score of the registered model is the run's own final metric.
    scores = out["promotion"]["challenger_scores"]
    assert scores["perplexity"] == pytest.approx(out["metrics"]["perplexity"], rel=1e-6)
    assert scores["accuracy"] == pytest.approx(out["metrics"]["eval_masked_accuracy"], abs=1e-6)
    # the quality floor: the model before fine-tuning, the run's own epoch-0 evaluation
    assert out["promotion"]["baseline"] == "untrained-model (epoch 0)"
    assert out["promotion"]["baseline_score"] == pytest.approx(out["metrics"]["epoch0_perplexity"], rel=1e-6)
    assert "beats the untrained-model (epoch 0) baseline" in out["decision"]
    mv = c.get_model_version("tiny-mlm", "1")
    assert float(mv.tags["promotion.baseline_score"]) == pytest.approx(out["metrics"]["epoch0_perplexity"], rel=1e-4)
    assert mv.run_id == out["run_id"]
    assert model_task("models:/tiny-mlm/1") == "fill-mask"
    assert "fill_mask_examples.json" in {f.path.split("/")[-1] for f in c.list_artifacts(out["run_id"], "eval")}
    printed = capsys.readouterr().out
    assert "== mlm finished ==" in printed and "fill-mask with the trained model" in printed

    # The plain loop, same data and eval masks: directly comparable in MLflow (epoch 0 is the same model).
    manual = mlm_flow(_cfg(tiny_model_dir, str(corpus), str(isolated / "out"), "manual", 1))
    assert manual["version"] == "2"
    # both versions scored on the same fixed masks by the same evaluation as in their runs
    assert manual["promotion"]["challenger_scores"]["perplexity"] == pytest.approx(manual["metrics"]["perplexity"], rel=1e-6)
    assert manual["promotion"]["champion_scores"]["perplexity"] == pytest.approx(out["metrics"]["perplexity"], rel=1e-6)
    assert c.get_run(manual["run_id"]).data.params["engine"] == "manual"
    assert sorted(m.step for m in c.get_metric_history(manual["run_id"], "eval_loss")) == [0, 1]
    m0 = {m.step: m.value for m in c.get_metric_history(manual["run_id"], "eval_loss")}[0]
    assert m0 == pytest.approx(loss[0], rel=1e-5)
