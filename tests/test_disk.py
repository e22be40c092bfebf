"""Bounded disk: a finished run keeps no checkpoint or model copy (a failed one keeps them for --resume);
`finetune gc` plans (dry run) then applies: run dirs by their MLflow run's status, stale RUNNING runs, unused
caches, and model versions beyond a retention count that hold no alias."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_classify_flow import flow_cfg

HEAVY = ("checkpoints", "trainer", "model")


def heavy_dirs(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_dir() and p.name in HEAVY]


@pytest.mark.usefixtures("prefect_harness")
def test_five_finished_runs_leave_no_checkpoint(sentiment_csv, tiny_model_dir, tmp_path, isolated):
    from flows.classify import classify_flow
    from tasks import registry

    out = tmp_path / "out"
    for seed in range(5):
        engine = "manual" if seed % 2 == 0 else "trainer"  # both engines' checkpoint layouts
        res = classify_flow(flow_cfg(sentiment_csv, tiny_model_dir, tmp_path, engine=engine,
                                     train={"epochs": 2, "seed": seed, "checkpoint_every_steps": 2}))
        assert res["model_dir"] is None
    runs = sorted((out / "classify").iterdir())
    assert len(runs) == 5
    assert heavy_dirs(out) == []  # no checkpoint, Trainer state or model copy of a finished run
    for run in runs:  # the small files stay: what made the model and how it scored
        assert {"metrics.json", "config.yaml"} <= {p.name for p in run.iterdir()}
    assert sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) < 1_000_000
    assert len(registry.list_versions("tiny-sentiment")) == 5  # every model was logged and registered first


@pytest.mark.usefixtures("prefect_harness")
def test_failed_run_keeps_checkpoints_and_keep_flag_keeps_them(sentiment_csv, tiny_model_dir, tmp_path, isolated,
                                                                 monkeypatch):
    import flows.lifecycle
    from flows.classify import classify_flow
    from tasks import tracking

    keep = classify_flow(flow_cfg(sentiment_csv, tiny_model_dir, tmp_path / "keep", train={
        "epochs": 1, "keep_checkpoints": True, "output_dir": str(tmp_path / "keep")}))
    assert Path(keep["model_dir"]).is_dir() and list((tmp_path / "keep").rglob("checkpoints/step-*"))

    def registry_down(*a, **kw):
        raise RuntimeError("registry unavailable")

    monkeypatch.setattr(flows.lifecycle, "publish_model", registry_down)
    with pytest.raises(RuntimeError):
        classify_flow(flow_cfg(sentiment_csv, tiny_model_dir, tmp_path / "fail", train={
            "epochs": 1, "output_dir": str(tmp_path / "fail")}))
    [run] = (tmp_path / "fail" / "classify").iterdir()
    assert tracking.client().get_run(run.name).info.status == "FAILED"
    assert list(run.glob("checkpoints/step-*")) and (run / "model").is_dir()  # --resume can still use them
    # the dir records its store (no credential) and run, and that its process ended: gc's proof, with the store's
    import json

    record = json.loads((run / "run.json").read_text())
    assert record["tracking_store"] == tracking.store_id() and record["run_id"] == run.name and record["ended"]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _run_dir(out: Path, run_id: str) -> Path:
    d = out / "classify" / run_id
    (d / "checkpoints" / "step-00000001").mkdir(parents=True)
    (d / "checkpoints" / "step-00000001" / "state.pt").write_bytes(b"\0" * 300_000)
    (d / "model").mkdir()
    (d / "model" / "model.safetensors").write_bytes(b"\0" * 200_000)
    (d / "model" / "metrics.json").write_text("{}")
    (d / "model" / "config.yaml").write_text("job: classify\n")
    (d / "eval_extras.json").write_text("{}")
    return d


def test_gc_dry_run_then_apply(tmp_path, isolated, capsys):
    from flows.cli import main
    from tasks import liveness, tracking

    out, cache = tmp_path / "out", tmp_path / "cache"
    ids = {}
    for name, status in [("finished", "FINISHED"), ("failed", "FAILED"), ("alive", None), ("dead", None)]:
        ids[name] = tracking.start_run("gc-test", name, {})
        if status:
            tracking.end_run(ids[name], status)
    tracking.set_tags(ids["alive"], liveness.liveness_tags())  # this process: alive
    tracking.set_tags(ids["dead"], {**liveness.liveness_tags(), liveness.PID: str(_dead_pid())})
    ids["orphan"] = "0123456789abcdef0123456789abcdef"  # a dir whose run this store does not know, no record
    ids["orphan-dead"] = "1123456789abcdef0123456789abcdef"  # ... recorded by this store, process dead for 10 days
    ids["other-live"] = "2123456789abcdef0123456789abcdef"  # a live run of another store
    ids["other-dead"] = "3123456789abcdef0123456789abcdef"  # another store's, process dead for 10 days
    ids["other-recent"] = "4123456789abcdef0123456789abcdef"  # another store's, dead for an hour: grace period
    dirs = {k: _run_dir(out, v) for k, v in ids.items()}
    ten_days = time.time() - 10 * 86400
    liveness.write_record(dirs["orphan-dead"], ids["orphan-dead"], pid=_dead_pid(), heartbeat=ten_days)
    elsewhere = {"tracking_store": "http://127.0.0.1:1"}
    liveness.write_record(dirs["other-live"], ids["other-live"], **elsewhere)  # this process: alive
    liveness.write_record(dirs["other-dead"], ids["other-dead"], **elsewhere, pid=_dead_pid(), heartbeat=ten_days)
    liveness.write_record(dirs["other-recent"], ids["other-recent"], **elsewhere, ended=time.time() - 3600)
    (cache / "data" / "old").mkdir(parents=True)
    (cache / "data" / "old" / "x.arrow").write_bytes(b"\0" * 1000)
    (cache / "data" / "fresh").mkdir()
    old = time.time() - 40 * 86400
    os.utime(cache / "data" / "old", (old, old))

    def snapshot():
        return sorted(str(p) for p in tmp_path.rglob("*") if "mlflow" not in p.name and "mlstore" not in str(p))

    before = snapshot()
    assert main(["gc", "--output-dir", str(out), "--cache-dir", str(cache)]) == 0
    dry = capsys.readouterr().out
    assert snapshot() == before  # a dry run changes nothing
    assert tracking.client().get_run(ids["dead"]).info.status == "RUNNING"
    assert "would mark KILLED" in dry and ids["dead"] in dry and "would free" in dry and "--yes" in dry
    assert ids["alive"] not in dry

    assert main(["gc", "--output-dir", str(out), "--cache-dir", str(cache), "--yes"]) == 0
    done = capsys.readouterr().out
    assert "freed" in done
    # finished: only the small files stay
    assert sorted(p.name for p in dirs["finished"].iterdir()) == ["config.yaml", "eval_extras.json", "metrics.json"]
    for k in ("failed", "dead", "orphan-dead"):  # nothing can resume them any more: the whole dir goes
        assert not dirs[k].exists(), k
    for k in ("alive", "orphan", "other-live", "other-recent"):  # never a live run, nor one gc cannot prove dead
        assert (dirs[k] / "checkpoints").is_dir() and (dirs[k] / "model").is_dir(), k
    for k in ("orphan", "other-live", "other-recent"):
        assert f"left alone        kept      {dirs[k]}" in done, k
    assert "a run of another tracking store (http://127.0.0.1:1)" in done
    # another store's run dead for longer than the grace period: its checkpoints go, its record and small files stay
    assert sorted(p.name for p in dirs["other-dead"].iterdir()) == [
        "config.yaml", "eval_extras.json", "metrics.json", "run.json"]
    c = tracking.client()
    assert c.get_run(ids["dead"]).info.status == "KILLED"
    assert "gone" in c.get_run(ids["dead"]).data.tags["finetune.killed_reason"]
    assert c.get_run(ids["alive"]).info.status == "RUNNING"
    assert not (cache / "data" / "old").exists() and (cache / "data" / "fresh").exists()


def test_gc_version_retention_keeps_aliased_versions(tmp_path, isolated, capsys):
    import mlflow

    from flows.cli import main
    from tasks import registry, tracking

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[str]) -> list[str]:
            return model_input

    artifact_dirs = {}
    for v in range(1, 7):
        rid = tracking.start_run("versions", f"r{v}", {})
        tracking.configure()
        mlflow.set_experiment(experiment_id=tracking.client().get_run(rid).info.experiment_id)
        info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=[])
        tracking.end_run(rid)
        assert registry.register_model(info.model_uri, "kept", rid) == str(v)
        artifact_dirs[v] = Path(tracking.client().get_logged_model(info.model_id).artifact_location
                                .removeprefix("file://"))
        assert artifact_dirs[v].is_dir()
    for alias, v in [("champion", 1), ("previous-champion", 2), ("challenger", 3)]:
        registry.set_alias("kept", alias, str(v))

    assert main(["gc", "--keep-versions", "2", "--output-dir", str(tmp_path / "none"),
                 "--cache-dir", str(tmp_path / "none")]) == 0
    assert "would remove (deleted) version   kept version 4" in capsys.readouterr().out
    assert len(registry.list_versions("kept")) == 6

    assert main(["gc", "--keep-versions", "2", "--yes", "--output-dir", str(tmp_path / "none"),
                 "--cache-dir", str(tmp_path / "none")]) == 0
    assert "1 model version(s)" in capsys.readouterr().out
    # the newest two and every aliased version stay; only version 4 (old, no alias) and its files go
    assert sorted(int(mv.version) for mv in registry.list_versions("kept")) == [1, 2, 3, 5, 6]
    assert registry.aliases("kept") == {"champion": "1", "previous-champion": "2", "challenger": "3"}
    assert not artifact_dirs[4].exists() and all(artifact_dirs[v].exists() for v in (1, 2, 3, 5, 6))


def test_gc_reclaims_models_of_finished_never_registered_runs(tmp_path, isolated, capsys):
    """A finished finetune run whose logged model no version uses (a losing sweep trial) loses it, dry run first;
    a registered one, a running one, a trial of a running sweep and another tool's run keep theirs."""
    import mlflow

    from flows.cli import main
    from tasks import registry, tracking

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[str]) -> list[str]:
            return model_input

    sweep = tracking.start_run("models", "sweep", {}, {"finetune.job": "classify"})  # still RUNNING

    def logged(name: str, tags: dict, end: bool = True) -> tuple[str, Path]:
        rid = tracking.start_run("models", name, {}, tags)
        tracking.configure()
        mlflow.set_experiment(experiment_id=tracking.client().get_run(rid).info.experiment_id)
        with mlflow.start_run(run_id=rid):  # the model belongs to the run
            info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=[])
        tracking.client().update_run(rid, status="FINISHED" if end else "RUNNING")
        return info.model_uri, Path(tracking.client().get_logged_model(info.model_id).artifact_location
                                    .removeprefix("file://"))

    job = {"finetune.job": "classify"}
    registered, reg_dir = logged("registered", job)
    registry.register_model(registered, "m", None)  # no run id: the model id alone marks it used
    _, loser_dir = logged("loser", job)
    _, live_dir = logged("live", job, end=False)
    _, trial_dir = logged("trial", {**job, "mlflow.parentRunId": sweep})
    _, foreign_dir = logged("foreign", {})
    none = ["--output-dir", str(tmp_path / "none"), "--cache-dir", str(tmp_path / "none")]
    assert main(["gc", *none]) == 0
    dry = capsys.readouterr().out
    assert dry.count("model never registered") == 1 and "(loser)" in dry and loser_dir.is_dir()
    assert main(["gc", "--yes", *none]) == 0
    assert "1 never-registered logged model(s)" in capsys.readouterr().out
    assert not loser_dir.exists()
    assert all(d.is_dir() for d in (reg_dir, live_dir, trial_dir, foreign_dir))


def test_gc_rejects_keep_versions_below_one(capsys):
    from flows.cli import main

    assert main(["gc", "--keep-versions", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --keep-versions 0")


@pytest.mark.usefixtures("prefect_harness")
def test_housekeeping_flow_is_gc_applied(tmp_path, isolated):
    """The nightly deployment `housekeeping` (deployments/prefect.yaml) is `finetune gc --yes`."""
    from flows.gc import housekeeping_flow
    from tasks import tracking

    rid = tracking.start_run("hk", "done", {})
    tracking.end_run(rid)
    d = _run_dir(tmp_path / "out", rid)
    assert housekeeping_flow(keep_versions=3, output_dirs=[str(tmp_path / "out")]) == 0
    assert not (d / "checkpoints").exists() and (d / "metrics.json").is_file()
