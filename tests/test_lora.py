"""LoRA through the core (`--peft lora`): both jobs, both engines, through the flow, the registry and predict;
resume from an adapter-only checkpoint."""
import os
from pathlib import Path

import numpy as np
import pytest

from tests.test_classify_flow import flow_cfg

LORA = {"peft": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}


def _logged_model_bytes(run_id: str) -> int:
    import mlflow

    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="")
    return sum(f.stat().st_size for f in Path(local).rglob("*") if f.is_file() and "model" in f.parts)


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("engine", ["manual", "trainer"])
def test_lora_classifier_trains_registers_and_predicts(engine, sentiment_csv, tiny_model_dir, tmp_path, isolated):
    from mlflow import MlflowClient

    from flows.classify import classify_flow
    from tasks.predict import predict

    cfg = flow_cfg(sentiment_csv, tiny_model_dir, tmp_path, engine=engine, **LORA,
                   train={"epochs": 10, "learning_rate": 5e-2, "keep_checkpoints": engine == "trainer"},
                   tracking={"registered_model": f"lora-{engine}"})
    out = classify_flow(cfg)
    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    p = c.get_run(out["run_id"]).data.params
    assert p["peft"] == "lora" and p["lora.r"] == "8" and p["engine"] == engine
    assert 0 < out["trainable_parameters"] < 0.1 * out["total_parameters"]
    assert int(p["trainable_parameters"]) == out["trainable_parameters"]
    # a frozen random tiny base learns slowly through rank-8 adapters: the loss falls, that is all asked here
    assert out["history"][-1]["train_loss"] < out["history"][0]["train_loss"]
    # the registered model is the adapter plus a reference to its base, and it predicts from the registry
    mv = c.get_model_version_by_alias(f"lora-{engine}", "champion")
    assert mv.run_id == out["run_id"]
    assert out["promotion"]["challenger_scores"]["f1"] == pytest.approx(out["metrics"]["eval_f1"], abs=1e-6)
    texts = ["a great wonderful film", "an awful boring mess"]
    res = predict(f"models:/lora-{engine}@champion", texts)
    # the registry model (base rebuilt from its reference + adapter + head) is the trained model, to the digit
    if engine == "manual":  # the finished run's model copy is gone: the registry model does not depend on it
        assert out["model_dir"] is None and not list(Path(cfg.train.output_dir).rglob("model"))
        assert len(res) == 2 and not list(Path(cfg.train.output_dir).rglob("checkpoints"))
    else:  # --keep-checkpoints: the local model copy stays and predicts exactly as the registry model
        from tasks.adapters import load_pipeline

        local = load_pipeline(out["model_dir"], "text-classification")
        for r, l in zip(res, local(texts)):
            assert r["label"] == l["label"] and r["score"] == pytest.approx(l["score"], abs=1e-5)
    # no full copy of the weights in the logged model (the tiny base alone is ~4 MB)
    assert _logged_model_bytes(out["run_id"]) < 2_000_000


@pytest.mark.usefixtures("prefect_harness")
def test_lora_mlm_sft_registers_and_fills_masks(tiny_model_dir, isolated):
    from flows.config import MLMConfig
    from flows.mlm import mlm_flow
    from tasks.predict import predict

    corpus = isolated / "corpus.txt"
    corpus.write_text("\n".join(["this is a great movie !", "the cat sat on the mat ."] * 100) + "\n")
    cfg = MLMConfig(group_texts=False, **LORA,
                    data={"dataset": str(corpus), "max_length": 16, "eval_fraction": 0.2, "eval_samples": 40},
                    train={"model": tiny_model_dir, "epochs": 2, "batch_size": 16, "learning_rate": 2e-2,
                           "output_dir": str(isolated / "out"), "seed": 0},
                    tracking={"registered_model": "lora-mlm"})
    out = mlm_flow(cfg)
    h = out["history"]
    assert h[-1]["eval_loss"] < h[0]["eval_loss"]
    assert out["trainable_parameters"] < 0.2 * out["total_parameters"]
    assert out["promotion"]["challenger_scores"]["perplexity"] == pytest.approx(out["metrics"]["perplexity"], rel=1e-6)
    [res] = predict("models:/lora-mlm@champion", ["this is a [MASK] movie !"], top_k=3)
    assert len(res["masks"][0]) == 3


def test_lora_resume_from_adapter_checkpoint_matches_uninterrupted(sentiment_csv, tiny_model_dir, tmp_path, isolated):
    from tests.test_reliability import Boom, _prepare, cfg_for, train_classifier

    cfg = cfg_for(sentiment_csv, tiny_model_dir, tmp_path / "a")
    cfg = cfg.model_validate({**cfg.model_dump(), **LORA})
    data, tok = _prepare(cfg)
    full = train_classifier(cfg, data, tok, str(tmp_path / "full"))

    def crash_after_epoch_2(metrics, step):
        if step == 2:
            raise Boom("killed after epoch 2")

    with pytest.raises(Boom):
        train_classifier(cfg, data, tok, str(tmp_path / "cut"), on_metrics=crash_after_epoch_2)
    ckpt = next((tmp_path / "cut" / "checkpoints").glob("step-*"))
    assert (ckpt / "model.safetensors").stat().st_size < 1_000_000  # adapter + head only, not the base weights
    resumed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"resume": True})})
    res = train_classifier(resumed, data, tok, str(tmp_path / "cut"))
    assert res.resumed_from and [h["epoch"] for h in res.history] == [1, 2, 3]
    np.testing.assert_allclose(res.final["eval_loss"], full.final["eval_loss"], rtol=1e-4, atol=1e-5)
