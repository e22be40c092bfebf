"""Checkpoints, resume, honest failure states and clear errors, in-process (the subprocess and server faults
are in test_faults.py)."""
import os
import resource
import signal

import numpy as np
import pytest

from flows.config import ClassifyConfig, ConfigError
from tasks.checkpoint import load_latest_checkpoint, save_checkpoint
from tasks.data import prepare_dataset
from tasks.tokenize import tokenize_dataset
from tasks.training import train


def train_classifier(cfg, data, tokenized, run_dir, **kw):
    """The core trainer on a classify config (the job's spec carries the label names)."""
    return train(cfg.spec(data.label_names), tokenized, run_dir, **kw)

METRICS = ("train_loss", "eval_loss", "eval_accuracy", "eval_f1")


def cfg_for(csv, model, out, **train):
    return ClassifyConfig.model_validate({
        "engine": train.pop("engine", "manual"),
        "data": {"dataset": csv, "text_column": "review", "label_column": "sentiment", "max_length": 16,
                 "eval_fraction": 0.25},
        "train": {"model": model, "freeze_embeddings": False, "dropout": None, "group_by_length": False, "epochs": 3, "batch_size": 8, "learning_rate": 1e-2, "warmup_ratio": 0.0,
                  "output_dir": str(out), **train},
    })


class Boom(Exception):
    pass


def _prepare(cfg):
    data = prepare_dataset(cfg.data, cfg.train.seed)
    return data, tokenize_dataset(data.path, cfg.train.model, cfg.data.max_length)


def test_corrupt_or_truncated_checkpoint_is_skipped(tmp_path):
    root = tmp_path / "ckpt"
    save_checkpoint(root, 1, {"epoch": 1, "x": np.arange(10)})
    save_checkpoint(root, 2, {"epoch": 2, "x": np.arange(20)})
    path, st = load_latest_checkpoint(root)
    assert path.name == "step-00000002" and st["epoch"] == 2
    # truncate the newest: the previous complete one is used
    f = root / "step-00000002" / "loop_state.pt"
    f.write_bytes(f.read_bytes()[:50])
    path, st = load_latest_checkpoint(root)
    assert path.name == "step-00000001" and st["epoch"] == 1
    # a dir left by a crash before its marker was written is ignored too
    (root / "step-00000003").mkdir()
    (root / "step-00000003" / "loop_state.pt").write_bytes(b"partial")
    assert load_latest_checkpoint(root)[0].name == "step-00000001"


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path):
    """RLIMIT_FSIZE makes writes past 64 KiB fail with EFBIG, as a full disk would."""
    root = tmp_path / "ckpt"
    save_checkpoint(root, 1, {"epoch": 1, "x": np.zeros(10)})
    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, old[1]))
    try:
        with pytest.raises(OSError):
            save_checkpoint(root, 2, {"epoch": 2, "x": np.zeros(100_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_sig)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]  # no temp dir left behind
    assert load_latest_checkpoint(root)[1]["epoch"] == 1


def _safetensors_write(folder):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(100_000)}, folder / "model.safetensors")


def _torch_save_write(folder):
    import torch

    torch.save({"state": torch.zeros(100_000)}, folder / "optimizer.bin")  # straight to the file, as accelerate does


@pytest.mark.parametrize("write", [_safetensors_write, _torch_save_write], ids=["safetensors", "torch.save"])
def test_accelerates_writers_on_a_full_disk_fail_cleanly(write, tmp_path):
    """save_state's writers report a short write in their own ways (safetensors: an error naming the OS error;
    torch.save to a file: a RuntimeError of its zip writer): each becomes one OSError naming the fix, the staging
    folder goes, the previous checkpoint stays."""
    root = tmp_path / "ckpt"
    save_checkpoint(root, 1, {"epoch": 1})
    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, old[1]))
    try:
        with pytest.raises(OSError, match=r"could not write checkpoint step-00000002 under .*Free disk space") as e:
            save_checkpoint(root, 2, {"epoch": 2}, write=write)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_sig)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]
    assert load_latest_checkpoint(root)[1]["epoch"] == 1


def test_a_crash_mid_checkpoint_leaves_nothing_a_later_run_trips_on(tmp_path):
    """A run killed while writing leaves a staging folder (never read) and maybe a corrupt folder of the step it was
    at; the resumed run reaches that step again: the stale staging folders go, the corrupt one is replaced."""
    root = tmp_path / "ckpt"
    save_checkpoint(root, 1, {"epoch": 1})
    (root / ".step-00000002.tmp-staging").mkdir()
    (root / ".step-00000002.tmp-staging" / "model.safetensors").write_bytes(b"torn")
    (root / ".step-00000005.tmp-staging").mkdir()  # a step the resumed run may not reach again
    (root / "step-00000002").mkdir()
    (root / "step-00000002" / "COMPLETE.json").write_text("{}")  # no checksums: skipped
    assert load_latest_checkpoint(root)[0].name == "step-00000001"
    save_checkpoint(root, 2, {"epoch": 2})
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001", "step-00000002"]
    assert load_latest_checkpoint(root)[1]["epoch"] == 2


def test_a_checkpoint_fails_on_every_process_when_one_fails_or_misses_files(tmp_path):
    """Rank 0's view: another process failed to write its part (the barrier says so) -> an OSError, no staging
    folder; every process wrote but a process's files are not in the folder (nodes without a shared output dir) ->
    one ConfigError naming them. Either way the previous checkpoint stays the newest."""
    root = tmp_path / "ckpt"
    save_checkpoint(root, 1, {"epoch": 1})
    phases = iter([False, True])  # prepare: fine; writing: another process failed
    with pytest.raises(OSError, match=r"another process failed \(its own error says why\); the previous checkpoint"):
        save_checkpoint(root, 2, {"epoch": 2}, any_failed=lambda failed: failed or next(phases))
    with pytest.raises(ConfigError, match=r"random_states_1.pkl, loop_rng_1.pt not found .* filesystem all of them"):
        save_checkpoint(root, 2, {"epoch": 2}, expected=["random_states_1.pkl", "loop_rng_1.pt"])
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]


@pytest.mark.parametrize("engine", ["manual", "trainer"])
def test_resume_after_interruption_matches_uninterrupted(engine, sentiment_csv, tiny_model_dir, tmp_path, isolated):
    cfg = cfg_for(sentiment_csv, tiny_model_dir, tmp_path / "a", engine=engine, checkpoint_every_steps=2)
    data, tok = _prepare(cfg)
    full = train_classifier(cfg, data, tok, str(tmp_path / "full"))

    logged: list[int] = []

    def crash_after_epoch_2(metrics, step):
        logged.append(step)
        if step == 2:
            raise Boom("killed after epoch 2")

    with pytest.raises(Boom):
        train_classifier(cfg, data, tok, str(tmp_path / "interrupted"), on_metrics=crash_after_epoch_2)
    assert logged == [1, 2]

    resumed_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"resume": True})})
    more: list[int] = []
    res = train_classifier(resumed_cfg, data, tok, str(tmp_path / "interrupted"), on_metrics=lambda m, s: more.append(s))
    assert res.resumed_from
    assert [h["epoch"] for h in res.history] == [1, 2, 3]
    for k in METRICS:
        np.testing.assert_allclose(res.final[k], full.final[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert 3 in more


def test_metrics_logger_is_idempotent_per_step(isolated):
    from tasks import tracking

    run_id = tracking.start_run("idem", "r", {"a": 1})
    log = tracking.MetricsLogger(run_id)
    log({"train_loss": 1.0}, 1)
    log({"train_loss": 0.5}, 2)
    again = tracking.MetricsLogger(run_id)  # as after a restart
    again({"train_loss": 9.0}, 2)
    again({"train_loss": 0.25}, 3)
    assert [(m.step, m.value) for m in tracking.client().get_metric_history(run_id, "train_loss")] == [
        (1, 1.0), (2, 0.5), (3, 0.25)]


def test_unreachable_tracking_server_fails_fast(monkeypatch):
    import socket
    import time

    from tasks import tracking

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="unreachable"):
        tracking.check_tracking_server()
    assert time.monotonic() - t0 < 10


@pytest.mark.usefixtures("prefect_harness")
def test_failed_training_marks_run_failed_and_registers_nothing(sentiment_csv, tiny_model_dir, tmp_path, isolated,
                                                                monkeypatch):
    from mlflow import MlflowClient

    import tasks.training.core as tc
    from flows.classify import classify_flow

    base = cfg_for(sentiment_csv, tiny_model_dir, tmp_path / "o")  # 3 epochs: it learns, so it beats the baseline
    cfg = base.model_copy(update={"tracking": base.tracking.model_copy(update={"registered_model": "rel-model",
                                                                              "experiment": "rel"})})
    first = classify_flow(cfg)  # a champion exists
    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert str(c.get_model_version_by_alias("rel-model", "champion").version) == first["version"]

    def broken_fit(*a, **k):
        raise RuntimeError("injected failure in training")

    monkeypatch.setattr(tc, "fit_manual", broken_fit)
    state = classify_flow(cfg, return_state=True)
    assert state.is_failed()
    assert "injected failure" in str(state.result(raise_on_failure=False))
    runs = c.search_runs([c.get_experiment_by_name("rel").experiment_id], order_by=["start_time DESC"])
    assert runs[0].info.status == "FAILED" and "injected failure" in runs[0].data.tags["finetune.error"]
    assert runs[1].info.status == "FINISHED"
    versions = c.search_model_versions("name='rel-model'")
    assert len(versions) == 1
    assert str(c.get_model_version_by_alias("rel-model", "champion").version) == first["version"]


@pytest.mark.usefixtures("prefect_harness")
def test_prefect_retry_resumes_from_the_last_checkpoint(sentiment_csv, tiny_model_dir, tmp_path, isolated,
                                                       monkeypatch):
    """The training task fails in epoch 2's evaluation; Prefect's retry resumes from epoch 1's checkpoint, in the
    same MLflow run, and ends where an uninterrupted run ends."""
    from mlflow import MlflowClient

    import tasks.evaluate as ev
    from flows.classify import classify_flow

    def flow_cfg(out, experiment):
        base = cfg_for(sentiment_csv, tiny_model_dir, tmp_path / out)
        return base.model_copy(update={"tracking": base.tracking.model_copy(
            update={"registered_model": experiment, "experiment": experiment})})

    reference = classify_flow(flow_cfg("ref", "retry-ref"))

    real, calls = ev.evaluate_classifier, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("injected: transient failure in epoch 2")
        return real(*a, **k)

    monkeypatch.setattr(ev, "evaluate_classifier", flaky)
    out = classify_flow(flow_cfg("retry", "retry"))
    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    [run] = c.search_runs([c.get_experiment_by_name("retry").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == out["run_id"]
    for k in METRICS:
        assert [m.step for m in c.get_metric_history(run.info.run_id, k)] == [1, 2, 3], k
        np.testing.assert_allclose(out["metrics"][k], reference["metrics"][k], rtol=1e-4, atol=1e-5, err_msg=k)
