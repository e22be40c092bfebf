"""Sweeps: the trial plan (grid, random, validation up front) as plain functions, and a real sweep of 3 tiny trials
on a local Ray through prefect-ray's RayTaskRunner, under the Prefect test server with MLflow on sqlite."""
import json
import os
from pathlib import Path

import pytest

from flows.config import ConfigError
from flows.sweep import SweepConfig, best_trial, load_sweep, trial_overrides


def test_grid_is_every_combination_up_to_the_budget():
    s = SweepConfig(parameters={"train.learning_rate": [1e-4, 2e-4], "train.warmup_ratio": [0.0, 0.1]}, max_trials=3)
    assert trial_overrides(s) == [
        {"train.learning_rate": 1e-4, "train.warmup_ratio": 0.0},
        {"train.learning_rate": 1e-4, "train.warmup_ratio": 0.1},
        {"train.learning_rate": 2e-4, "train.warmup_ratio": 0.0},
    ]


def test_random_search_is_seeded_and_stays_in_range():
    s = SweepConfig(method="random", max_trials=5, seed=3,
                    parameters={"train.learning_rate": {"min": 1e-5, "max": 1e-3, "log": True},
                                "train.batch_size": [8, 16]})
    a, b = trial_overrides(s), trial_overrides(s)
    assert a == b and len(a) == 5
    assert all(1e-5 <= t["train.learning_rate"] <= 1e-3 and t["train.batch_size"] in (8, 16) for t in a)


def test_bad_sweeps_fail_before_anything_starts(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("parameters:\n  train.learning_rate: {min: 0.1, max: 0.2}\n")
    with pytest.raises(ConfigError, match="grid search needs lists"):
        load_sweep(str(f))
    f.write_text("parameters:\n  train.learnin_rate: [0.1]\n  train.batch_size: [0]\n")
    with pytest.raises(ConfigError) as e:
        load_sweep(str(f))
    assert any("learnin_rate" in p for p in e.value.problems) and any("batch_size" in p for p in e.value.problems)
    f.write_text("parameters: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_sweep(str(f))
    with pytest.raises(ConfigError, match="not found"):
        load_sweep(str(tmp_path / "missing.yaml"))


def test_best_trial_respects_the_direction_and_skips_failures():
    rows = [{"trial": 0, "status": "FINISHED", "eval_loss": 0.5}, {"trial": 1, "status": "FAILED"},
            {"trial": 2, "status": "FINISHED", "eval_loss": 0.4}]
    assert best_trial(rows, "eval_loss", higher=False)["trial"] == 2
    assert best_trial(rows, "eval_loss", higher=True)["trial"] == 0
    assert best_trial([rows[1]], "eval_loss", True) is None


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_sweep_on_ray_records_trials_and_registers_the_best(sentiment_csv, tiny_model_dir, tmp_path, isolated,
                                                            capfd):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    from flows.sweep import sweep_flow

    sweep = SweepConfig.model_validate({
        "job": "classify",
        "base": {
            "data": {"dataset": sentiment_csv, "text_column": "review", "label_column": "sentiment",
                     "max_length": 16, "eval_fraction": 0.25},
            "train": {"model": tiny_model_dir, "freeze_embeddings": False, "dropout": None, "group_by_length": False, "epochs": 3, "batch_size": 8, "warmup_ratio": 0.0,
                      "output_dir": str(tmp_path / "out")},
            "tracking": {"registered_model": "tiny-sweep", "experiment": "test-sweep"},
        },
        # trial 2 fails inside training (an unknown scheduler): recorded, and the sweep goes on
        "parameters": {"train.learning_rate": [1e-2, 3e-3], "train.lr_scheduler": ["linear", "no-such-schedule"]},
        "max_trials": 3, "max_concurrent": 2, "resources": {"cpus": 1},
    })
    capfd.readouterr()
    out = sweep_flow(sweep)
    printed = "".join(capfd.readouterr())  # the driver's and (log_to_driver) the Ray workers' output
    # as quiet as a training run: no Ray token-auth warning (token auth stays on), no mlflow.transformers notices
    # from the workers, no colour codes in output that is not a terminal
    for noise in ("Token authentication", "The model card could not be retrieved", "Unable to find license", "\x1b["):
        at = printed.find(noise)
        assert at < 0, printed[max(0, at - 300):at + 300]
    assert os.environ.get("RAY_AUTH_MODE") == "token"

    assert [t["status"] for t in out["trials"]] == ["FINISHED", "FAILED", "FINISHED"]
    assert "no-such-schedule" in out["trials"][1]["error"] and out["failed"] == 1
    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    parent = c.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["finetune.sweep"] == "true"
    children = c.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED", "FINISHED"]
    for r in children:  # each trial is a full run: its params and, when it trained, its per-epoch metrics
        assert r.data.params["train.learning_rate"] in ("0.01", "0.003")
        if r.info.status == "FINISHED":
            assert [m.step for m in c.get_metric_history(r.info.run_id, "eval_f1")] == [1, 2, 3]
    table = json.loads(open(c.download_artifacts(parent.info.run_id, "sweep/sweep.json")).read())
    assert [t["trial"] for t in table["trials"]] == [0, 1, 2] and table["metric"] == "eval_f1"
    # only the best trial is registered, through the champion/challenger gate
    best = out["trials"][out["best_trial"]]
    assert best["eval_f1"] == max(t["eval_f1"] for t in out["trials"] if t["status"] == "FINISHED")
    versions = c.search_model_versions("name='tiny-sweep'")
    assert [str(v.version) for v in versions] == ["1"] and versions[0].run_id == best["run_id"]
    gate = c.get_model_version("tiny-sweep", "1").tags
    assert gate["promotion.decision"] in ("promoted", "rejected") and out["decision"]
    assert ("champion" in out["aliases"]) == (gate["promotion.decision"] == "promoted")
    # the store stays bounded: only the registered trial keeps a logged model
    models = c.search_logged_models([parent.info.experiment_id])
    assert [m.source_run_id for m in models] == [best["run_id"]]
    # readable, unique names: the parent run as the flow run, the trials by their parameters
    import re

    assert re.fullmatch(r"sweep-classify-\d{8}-\d{6}-[0-9a-f]{4}", parent.info.run_name) and out["name"] == parent.info.run_name
    assert sorted(r.info.run_name for r in children) == [
        "trial-0-lr=0.01-lr_scheduler=linear", "trial-1-lr=0.01-lr_scheduler=no-such-schedule",
        "trial-2-lr=0.003-lr_scheduler=linear"]
    assert out["wall_seconds"] >= out["trials_seconds"] > 0
    # the trials ran on Ray workers and reported to this Prefect server: three task runs named like their runs
    with get_client(sync_client=True) as pc:
        names = {tr.name for tr in pc.read_task_runs() if tr.name.startswith("trial-")}
        flow_names = {fr.name for fr in pc.read_flow_runs() if fr.name.startswith("sweep-classify")}
    assert {r.info.run_name for r in children} <= names
    assert parent.info.run_name in flow_names


def test_sweep_cli_bad_input_is_one_line_before_prefect(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    f = tmp_path / "s.yaml"
    f.write_text("base: {data: {dataset: /no/such/file.csv}}\nparameters: {train.learning_rate: [0.1]}\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    p = subprocess.run([sys.executable, "-m", "flows.cli", "sweep", "--config", str(f)], capture_output=True,
                       text=True, env=env, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 2 and "Traceback" not in out
    assert [line for line in out.splitlines() if line.startswith("error:")] == [
        "error: dataset file '/no/such/file.csv' not found: pass an existing CSV/JSON/JSONL/Parquet/TXT file, or a Hub "
        "dataset id"]
    assert "temporary server" not in out  # found before Prefect (or Ray) started


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_trial_and_a_run_log_the_same(tmp_path, isolated):
    """One path from a config to a logged model: a sweep trial (no Ray: its plain function, nested under a parent
    run) and the training flow's run of the same config log the same evaluation artifacts, the same model files and
    the same input example, written in the model's own mask token (`<mask>` for this tiny RoBERTa); only the run
    registers its model."""
    import mlflow

    from conftest import build_family
    from flows.config import MLMConfig
    from flows.mlm import mlm_flow
    from flows.sweep import train_trial
    from tasks import tracking
    from tasks.data import prepare_dataset

    model = build_family("roberta", tmp_path / "roberta")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("this is a great movie !\nthe cat sat on the mat .\n" * 20)
    cfg = MLMConfig(engine="manual", group_texts=False,
                    data={"dataset": str(corpus), "max_length": 16, "eval_fraction": 0.25},
                    train={"model": model, "epochs": 1, "batch_size": 8, "output_dir": str(tmp_path / "out")},
                    tracking={"registered_model": "tiny-roberta-mlm"})
    run = mlm_flow(cfg)
    data = prepare_dataset(cfg.data, cfg.train.seed)
    spec = cfg.spec(data.label_names)
    parent = tracking.start_run(cfg.experiment, "sweep-parent", {}, {"finetune.sweep": "true"})
    trial = train_trial(cfg, parent, 0, {}, data.path, cfg.recipe.tokenize(data.path, model, spec), data.label_names)
    assert trial["status"] == "FINISHED", trial.get("error")

    c = tracking.client()
    assert c.get_run(trial["run_id"]).data.tags["mlflow.parentRunId"] == parent

    def logged(run_id: str, model_uri: str) -> tuple[set, set, list]:
        evals = {a.path.split("/")[-1] for a in c.list_artifacts(run_id, "eval")}
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp_path / run_id))
        files = {str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file()}
        return evals, files, json.loads((Path(local) / "input_example.json").read_text())

    run_evals, run_files, run_example = logged(run["run_id"], run["logged_model_uri"])
    trial_evals, trial_files, trial_example = logged(trial["run_id"], trial["_model_uri"])
    assert run_evals == trial_evals and {"loss_curve.png", "metrics.json", "fill_mask_examples.json"} <= run_evals
    assert run_files == trial_files
    assert run_example == trial_example and "<mask>" in json.dumps(run_example) and "[MASK]" not in json.dumps(run_example)
    assert run["version"] == "1" and "version" not in trial  # only the run registered its model
    assert [mv.run_id for mv in c.search_model_versions("name = 'tiny-roberta-mlm'")] == [run["run_id"]]


def _tiny_sweep(sentiment_csv, tiny_model_dir, tmp_path, **over) -> SweepConfig:
    return SweepConfig.model_validate({
        "job": "classify",
        "base": {
            "data": {"dataset": sentiment_csv, "text_column": "review", "label_column": "sentiment",
                     "max_length": 16, "eval_fraction": 0.25},
            "train": {"model": tiny_model_dir, "freeze_embeddings": False, "dropout": None, "group_by_length": False,
                      "epochs": 3, "batch_size": 8, "warmup_ratio": 0.0, "output_dir": str(tmp_path / "out")},
            "tracking": {"registered_model": "tiny-sweep", "experiment": "test-sweep"},
        },
        "max_concurrent": 1, "resources": {"cpus": 1}, "promote": False, **over,
    })


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_tpe_sweep_prunes_a_learning_rate_that_cannot_learn_and_resumes(tiny_model_dir, tmp_path, isolated):
    """TPE with the median pruner over a learning rate that learns (1e-2) and one that cannot (1e-9): a trial of
    the one that cannot is stopped after an epoch (a KILLED nested run with its pruned.* tags, no model, no
    checkpoint); `resume` adds trials to the same study and never trains a finished trial again."""
    import optuna
    from mlflow import MlflowClient

    from flows.sweep import sweep_flow
    from tasks import search
    from tests.conftest import write_sentiment_csv

    sentiment_csv = write_sentiment_csv(tmp_path, repeat=8)  # 12 steps an epoch: 1e-2 learns in the first epoch
    space = {"train.learning_rate": [1e-2, 1e-9], "train.weight_decay": [0.0, 0.01, 0.1]}
    sweep = _tiny_sweep(sentiment_csv, tiny_model_dir, tmp_path, method="tpe", pruner="median", startup_trials=1,
                        seed=0, parameters=space, max_trials=4)
    first = sweep_flow(sweep)
    second = sweep_flow(sweep.model_copy(update={"resume": True, "max_trials": 3}))
    rows = first["trials"] + second["trials"]
    print([(r["trial"], r["train.learning_rate"], r["train.weight_decay"], r["status"], r.get("eval_f1"),
            r.get("epochs_trained")) for r in rows])
    # resume: the same study; new trials after the first run's; the space has 6 points and none ran twice
    assert second["study"] == first["study"] and second["study_finished_trials"] == len(rows) == 6
    assert min(r["trial"] for r in second["trials"]) > max(r["trial"] for r in first["trials"])
    storage = search.open_storage(search.storage_url())
    assert search.storage_url().endswith(str(isolated / "optuna.db"))  # beside the tracking store
    study = optuna.load_study(study_name=first["study"], storage=storage)
    done = search.finished(study)
    assert len({tuple(sorted(t.params.items())) for t in done}) == len(done) == 6
    # the learning rate that cannot learn is pruned, and only it
    pruned = [r for r in rows if r["status"] == "PRUNED"]
    assert pruned and all(r["train.learning_rate"] == 1e-9 for r in pruned)
    assert all(r["epochs_trained"] < 3 and r["pruned_at_epoch"] == r["epochs_trained"] for r in pruned)
    assert first["pruned"] + second["pruned"] == len(pruned) and not first["failed"] and not second["failed"]
    c = MlflowClient()
    for r in pruned:
        run = c.get_run(r["run_id"])
        assert run.info.status == "KILLED", run.info.status
        tags = run.data.tags
        assert tags["pruned.at_epoch"] == str(r["pruned_at_epoch"]) and tags["pruned.metric"] == "eval_f1"
        assert float(tags["pruned.eval_f1"]) == pytest.approx(r["eval_f1"], abs=1e-5)
        assert tags["pruned.reason"].startswith(f"median pruner: eval_f1 {r['eval_f1']:.4f} at epoch")
        assert [m.step for m in c.get_metric_history(r["run_id"], "eval_f1")] == list(range(1, r["epochs_trained"] + 1))
        run_dir = tmp_path / "out" / "classify" / r["run_id"]
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "model").exists()
        assert not c.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{r['run_id']}'")
    best = max((r for r in rows if r["status"] == "FINISHED"), key=lambda r: r["eval_f1"])
    assert best["train.learning_rate"] == 1e-2
