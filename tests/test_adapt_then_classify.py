"""Domain adaptation then classification as one flow (flows/adapt_then_classify.py) on tiny models: the mlm
subflow registers a version, the classify subflow trains from it (or from the pretrained checkpoint when the
version did not beat its floor), and the two MLflow runs link to each other."""
from __future__ import annotations

import pytest

from flows.adapt_then_classify import AdaptThenClassifyConfig, adapted_base, summary


def _mlm_out(**promotion) -> dict:
    return {"run_id": "r1", "version": "3", "model_uri": "models:/m/3", "decision": "d", "promotion": promotion}


def test_adapted_base_only_when_the_version_beat_its_floor():
    ok = dict(metric="perplexity", challenger_score=80.0, baseline_score=120.0, challenger_error=None)
    assert adapted_base(_mlm_out(**ok))[0] == "models:/m/3"
    uri, why = adapted_base(_mlm_out(**{**ok, "challenger_score": 130.0}))
    assert uri is None and "did not beat its floor (perplexity 130 vs 120" in why
    assert adapted_base(_mlm_out(**{**ok, "challenger_score": 130.0}), require_floor=False)[0] == "models:/m/3"
    assert adapted_base(_mlm_out(**{**ok, "challenger_error": "smoke failed"}))[0] is None
    assert adapted_base({"run_id": "r1", "version": None})[0] is None
    text = summary(_mlm_out(), {"run_id": "r2", "version": "1", "metrics": {}}, None, "why", "bundled-minilm")
    assert "classify started from  bundled-minilm (the pretrained checkpoint)" in text


@pytest.mark.usefixtures("prefect_harness")
def test_adapt_then_classify_on_tiny_models(isolated, tiny_model_dir, sentiment_csv, tmp_path, capsys):
    from flows.adapt_then_classify import adapt_then_classify_flow, precheck
    from tasks import tracking

    data = {"dataset": sentiment_csv, "text_column": "review", "max_length": 16, "eval_fraction": 0.25}
    train = {"model": tiny_model_dir, "epochs": 2, "batch_size": 8, "learning_rate": 1e-2, "warmup_ratio": 0.0,
             "group_by_length": False, "output_dir": str(tmp_path / "out"), "seed": 0}
    cfg = AdaptThenClassifyConfig.model_validate({
        "mlm": {"engine": "manual", "group_texts": False, "data": data, "train": train,
                "tracking": {"registered_model": "tiny-fill-mask"}},
        "classify": {"data": {**data, "label_column": "sentiment"}, "train": {**train, "epochs": 1},
                     "tracking": {"registered_model": "tiny-sentiment"}},
    })
    precheck(cfg)
    out = adapt_then_classify_flow(cfg)

    mlm, cls = out["mlm"], out["classify"]
    c = tracking.client()
    mrun, crun = c.get_run(mlm["run_id"]), c.get_run(cls["run_id"])
    # one parent flow run, two subflows (the two MLflow runs carry the same parent's id)
    assert mrun.data.tags["finetune.pipeline_flow_run_id"] == crun.data.tags["finetune.pipeline_flow_run_id"] != ""
    assert mrun.data.tags["prefect.flow_run_id"] != crun.data.tags["prefect.flow_run_id"]
    # linked both ways
    assert mrun.data.tags["finetune.downstream_run_id"] == cls["run_id"]
    assert crun.data.tags["finetune.upstream_run_id"] == mlm["run_id"]
    assert out["adapted"], out["reason"]  # 2 epochs at 1e-2 on a repeated corpus: perplexity well below epoch 0
    assert crun.data.params["train.model"] == f"models:/tiny-fill-mask/{mlm['version']}"
    assert crun.data.params["base.version"] == mlm["version"] and crun.data.params["base.run_id"] == mlm["run_id"]
    assert cls["run_id"] in mrun.data.tags["finetune.derived_run_ids"]
    assert crun.data.tags["finetune.adapted_base"] == "true"
    assert f"classify started from  models:/tiny-fill-mask/{mlm['version']}" in capsys.readouterr().out

    # the two flow runs are subflows of the combined one in Prefect
    import asyncio

    from prefect.client.orchestration import get_client as client

    async def parents():
        async with client() as pc:
            runs = [await pc.read_flow_run(r.data.tags["prefect.flow_run_id"]) for r in (mrun, crun)]
            return {str(r.parent_task_run_id is not None) for r in runs}

    assert asyncio.run(parents()) == {"True"}
