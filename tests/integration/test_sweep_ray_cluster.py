"""`finetune sweep --ray-address` against a real two-node Ray cluster on this machine (`ray start --head`, then a
second `ray start --address` node; loopback, token authentication, one CPU each): a TPE sweep with the median
pruner whose two trials, one CPU each, run at the same time, so one on each node; each trial reaches the study
through its RDB storage (the sqlite file beside the tracking store) from its node."""
from __future__ import annotations

import json
import secrets
import subprocess
import sys

import pytest

from _servers import ROOT, clean_env, two_node_ray_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_tpe_sweep_on_a_two_node_ray_cluster(tmp_path, tiny_model_dir):
    import optuna
    from mlflow import MlflowClient

    from tests.conftest import write_sentiment_csv

    csv = write_sentiment_csv(tmp_path, repeat=4)
    env = clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", PYTHONPATH=str(ROOT),
                    FINETUNE_CACHE_DIR=str(tmp_path / "cache"), RAY_AUTH_MODE="token",
                    RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(json.dumps({  # JSON is YAML
        "job": "classify", "method": "tpe", "pruner": "median", "startup_trials": 1, "seed": 0,
        "base": {"data": {"dataset": csv, "text_column": "review", "label_column": "sentiment", "max_length": 16,
                          "eval_fraction": 0.25},
                 "train": {"model": tiny_model_dir, "freeze_embeddings": False, "group_by_length": False,
                           "epochs": 2, "batch_size": 8, "warmup_ratio": 0.0, "output_dir": str(tmp_path / "out")},
                 "tracking": {"registered_model": "cluster-sweep", "experiment": "cluster-sweep"}},
        "parameters": {"train.learning_rate": [1e-2, 3e-3], "train.weight_decay": [0.0, 0.1]},
        "max_trials": 2, "max_concurrent": 2, "resources": {"cpus": 1}, "promote": False}))

    with two_node_ray_cluster(env, tmp_path, "rsw") as address:
        p = subprocess.run([sys.executable, "-m", "flows.cli", "sweep", "--config", str(sweep), "--ray-address",
                            address, "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        out = json.loads(p.stdout[p.stdout.index("{"):])
    assert len(out["trials"]) == 2 and {t["status"] for t in out["trials"]} <= {"FINISHED", "PRUNED"}
    assert out["best_trial"] is not None
    # both trials ran at once (one CPU each, one per node), each a nested run that reported to the study
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = [c.get_run(t["run_id"]).info for t in out["trials"]]
    a, b = sorted(runs, key=lambda r: r.start_time)
    assert b.start_time < a.end_time, "the two trials did not overlap: not one per node"
    study = optuna.load_study(study_name=out["study"], storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    reported = [t.intermediate_values for t in study.trials if t.number in {x["trial"] for x in out["trials"]}]
    assert all(v and set(v) <= {1, 2} for v in reported), reported  # each trial's epochs, from its node
