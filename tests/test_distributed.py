"""Data-parallel training under torchrun (tasks/distributed/): the classify flow with `--nproc-per-node 2` runs
its training step as `python -m torch.distributed.run` with 2 CPU processes on gloo, under the Prefect test harness
with MLflow on sqlite in tmp_path. One MLflow run, one metric point per epoch (logged by rank 0 only), the global
batch logged as such, a registered version; and the final metrics equal (allclose) those of one process training
on the same global batch (2 x 4 = 8), seed and sample order.

The reference is the same training core in one process with a DistributedSampler over 1 replica: the default
single-process loader draws every epoch's order from one seeded generator, DistributedSampler from seed + epoch,
so only from the same sampler is the sample order of each global batch the same. The tiny model has no dropout:
with dropout, two processes draw other masks than one does."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture(scope="module")
def tiny_model_no_dropout(tmp_path_factory) -> str:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from conftest import _tokenizer_path

    out = tmp_path_factory.mktemp("tiny-bert-nodrop")
    tok = AutoTokenizer.from_pretrained(_tokenizer_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, architectures=["BertForMaskedLM"])
    torch.manual_seed(0)
    BertForMaskedLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def flow_cfg(csv: str, model: str, tmp_path: Path, **train):
    from flows.config import ClassifyConfig

    return ClassifyConfig.model_validate({
        "data": {"dataset": csv, "text_column": "review", "label_column": "sentiment", "max_length": 16,
                 "eval_fraction": 0.25},  # 36 train rows: 18 per rank, batches of 4 (global 8) and a last of 2+2
        "train": {"model": model, "freeze_embeddings": False, "dropout": None, "group_by_length": False, "epochs": 2, "batch_size": 4, "learning_rate": 2e-2, "warmup_ratio": 0.0,
                  "output_dir": str(tmp_path / "out"), "keep_checkpoints": True,
                  "precision": "fp32", **train},  # checkpoints inspected below; fp32: compared number for number
        "tracking": {"registered_model": "ddp-sentiment", "experiment": "test-ddp"},
    })


def test_two_gloo_processes_one_run_and_the_same_metrics_as_one_process(
        sentiment_csv, tiny_model_no_dropout, tmp_path, isolated):
    from mlflow import MlflowClient

    from flows.classify import classify_flow
    from tasks import distributed
    from tasks.jobs import JobSpec
    from tasks.training import build_loaders, train

    out = classify_flow(flow_cfg(sentiment_csv, tiny_model_no_dropout, tmp_path, nproc_per_node=2))

    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = c.search_runs([c.get_experiment_by_name("test-ddp").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == out["run_id"] and runs[0].info.status == "FINISHED"
    for key in ("train_loss", "eval_loss", "eval_accuracy", "eval_f1"):
        assert [m.step for m in c.get_metric_history(out["run_id"], key)] == [1, 2], key
    p = runs[0].data.params
    assert p["train.batch_size"] == "4" and p["train.nproc_per_node"] == "2"
    assert p["train.global_batch_size"] == "8" and p["distributed.world_size"] == "2"
    assert p["distributed.backend"] == "gloo" and "x 2 processes (gloo)" in p["device"]
    mv = c.get_model_version("ddp-sentiment", "1")
    assert mv.run_id == out["run_id"] and out["version"] == "1"
    # rank 0 wrote the checkpoints and the model, once
    run_dir = Path(out["model_dir"]).parent
    assert (run_dir / "model" / "model.safetensors").exists() and list((run_dir / "checkpoints").iterdir())

    # the reference: one process, global batch 8, same seed, the same order of samples
    launched = json.loads((run_dir / "distributed" / "command.json").read_text())
    assert launched["command"][1:5] == ["-m", "torch.distributed.run", "--nproc-per-node", "2"]
    spec = JobSpec.model_validate_json((run_dir / "distributed" / "spec.json").read_text())
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"nproc_per_node": 1, "batch_size": 8})})
    loaders = distributed.shard_train_loader(build_loaders(launched["tokenized"], spec), spec.train.seed,
                                             num_replicas=1, rank=0)
    ref = train(spec, launched["tokenized"], str(tmp_path / "reference"), loaders=loaders)

    assert [r["epoch"] for r in out["history"]] == [r["epoch"] for r in ref.history] == [1, 2]
    for got, want in zip(out["history"], ref.history):
        for key in ("train_loss", "eval_loss", "eval_accuracy", "eval_f1"):
            assert math.isclose(got[key], want[key], rel_tol=1e-4, abs_tol=1e-5), (got["epoch"], key, got, want)
    # and it learned something (the comparison is not between two untrained models)
    assert out["history"][-1]["train_loss"] < out["history"][0]["train_loss"]


def test_torchrun_command_single_and_multi_node():
    from tasks.distributed import torchrun_command
    from tasks.training import TrainConfig

    one = torchrun_command(TrainConfig(nproc_per_node=2), ["--spec", "s.json"])
    assert one[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1", "--standalone",
                       "-m", "tasks.distributed", "--spec", "s.json"]
    multi = torchrun_command(TrainConfig(nproc_per_node=4, nnodes=2, rdzv_endpoint="node0:29400"), [], "run1")
    assert " ".join(multi[3:]) == ("--nproc-per-node 4 --nnodes 2 --rdzv-backend c10d --rdzv-endpoint node0:29400 "
                                   "--rdzv-id run1 -m tasks.distributed")


def test_multi_node_without_endpoint_is_a_config_error(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "flows.cli", "classify", "--nnodes", "2"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"})
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "--rdzv-endpoint HOST:PORT" in lines[0], p.stderr


def test_a_failing_rank_fails_the_launch(tmp_path, tiny_model_no_dropout):
    """torchrun's non-zero exit (here: every rank fails to read a tokenized dataset that is not there) is an
    exception in the training task, naming the exit code."""
    from tasks.distributed import launch
    from tasks.jobs import JobSpec
    from tasks.training import TrainConfig

    spec = JobSpec(job="classify", train=TrainConfig(model=tiny_model_no_dropout, nproc_per_node=2),
                   options={"engine": "manual"}, label_names=["negative", "positive"])
    with pytest.raises(RuntimeError, match="torchrun exited with code 1"):
        launch(spec, str(tmp_path / "missing-dataset"), str(tmp_path / "run"), None)
    assert not (tmp_path / "run" / "distributed" / "result.json").exists()


def test_a_killed_rank_fails_the_task_and_the_retry_resumes_from_the_checkpoint(tiny_model_no_dropout, tmp_path):
    """The CLI trains with 2 ranks; once rank 0 has written a mid-epoch checkpoint, rank 1 is killed (SIGKILL).
    torchrun exits non-zero, the training task fails, Prefect's retry launches torchrun again with resume: the
    same MLflow run ends FINISHED with one point per epoch, and the metrics equal one process's (batch 8)."""
    import signal
    import subprocess
    import sys
    import time

    import psutil
    from mlflow import MlflowClient

    from conftest import write_sentiment_csv
    from tasks import distributed
    from tasks.jobs import JobSpec
    from tasks.training import build_loaders, train
    from tests.integration._servers import clean_env

    csv = write_sentiment_csv(tmp_path, repeat=40)  # 480 train rows: 60 steps of 4 per rank and epoch
    env = clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", FINETUNE_CACHE_DIR=str(tmp_path / "c"),
                    FINETUNE_MLFLOW_STORE=str(tmp_path / "store"), PREFECT_HOME=str(tmp_path / "prefect"))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "flows.cli", "classify", "--dataset", csv, "--text-column", "review",
           "--label-column", "sentiment", "--model", tiny_model_no_dropout, "--no-freeze-embeddings", "--max-length", "32",
           "--batch-size", "4",
           "--learning-rate", "5e-3", "--warmup-ratio", "0", "--epochs", "3", "--output-dir", str(out),
           "--eval-fraction", "0.25", "--experiment", "ddp-faults", "--registered-model", "ddp-faults",
           "--nproc-per-node", "2", "--checkpoint-every-steps", "20", "--precision", "fp32", "--keep-checkpoints",
           "--json"]
    log = (tmp_path / "cli.log").open("w")
    proc = subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parents[1], stdout=log,
                            stderr=subprocess.STDOUT)
    rank1 = None
    while rank1 is None or not list(out.glob("classify/*/checkpoints/step-*")):
        assert proc.poll() is None, (tmp_path / "cli.log").read_text()[-5000:]
        if rank1 is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if "tasks.distributed" in child.cmdline() and child.environ().get("RANK") == "1":
                        rank1 = child
                except psutil.Error:
                    pass
        time.sleep(0.02)
    rank1.send_signal(signal.SIGKILL)
    assert proc.wait(600) == 0, (tmp_path / "cli.log").read_text()[-5000:]
    text = (tmp_path / "cli.log").read_text()
    lines = [ln[:300] for ln in text.splitlines() if "torchrun exited" in ln or "resumed from" in ln]
    assert any("torchrun exited with code 1" in ln for ln in lines), text[-5000:]
    assert any("rank 0:" in ln and "resumed from" in ln and "step-" in ln for ln in lines), lines

    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    [run] = c.search_runs([c.get_experiment_by_name("ddp-faults").experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "eval_loss", "eval_accuracy", "eval_f1"):
        assert [m.step for m in c.get_metric_history(run.info.run_id, key)] == [1, 2, 3], key
    assert c.get_model_version("ddp-faults", "1").run_id == run.info.run_id

    run_dir = out / "classify" / run.info.run_id
    launched = json.loads((run_dir / "distributed" / "command.json").read_text())
    spec = JobSpec.model_validate_json((run_dir / "distributed" / "spec.json").read_text())
    spec = spec.model_copy(update={"train": spec.train.model_copy(
        update={"nproc_per_node": 1, "batch_size": 8, "resume": False})})
    loaders = distributed.shard_train_loader(build_loaders(launched["tokenized"], spec), spec.train.seed,
                                             num_replicas=1, rank=0)
    ref = train(spec, launched["tokenized"], str(tmp_path / "reference"), loaders=loaders)
    for key in ("train_loss", "eval_loss", "eval_accuracy", "eval_f1"):
        got = [m.value for m in sorted(c.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
        want = [row[key] for row in ref.history]
        assert all(math.isclose(g, w, rel_tol=1e-4, abs_tol=1e-5) for g, w in zip(got, want)), (key, got, want)


def test_hf_trainer_engine_shards_under_torchrun(sentiment_csv, tiny_model_no_dropout, tmp_path, isolated):
    """`--engine trainer`: the HF Trainer does its own DDP inside the torchrun ranks (the ranks only set up the
    process group): 36 training rows, 18 per rank in batches of 4, make 5 optimizer steps an epoch (one process
    with batch 4 would take 9); one MLflow run, one point per epoch, the global batch logged."""
    from mlflow import MlflowClient

    from flows.classify import classify_flow

    cfg = flow_cfg(sentiment_csv, tiny_model_no_dropout, tmp_path, nproc_per_node=2)
    cfg = cfg.model_copy(update={"engine": "trainer"})
    out = classify_flow(cfg)
    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    [run] = c.search_runs([c.get_experiment_by_name("test-ddp").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["engine"] == "trainer"
    assert run.data.params["train.global_batch_size"] == "8"
    for key in ("train_loss", "eval_loss", "eval_f1"):
        assert [m.step for m in c.get_metric_history(run.info.run_id, key)] == [1, 2], key
    run_dir = Path(out["model_dir"]).parent
    states = [json.loads(p.read_text()) for p in run_dir.glob("trainer/checkpoint-*/trainer_state.json")]
    assert max(s["global_step"] for s in states) == 10  # 2 epochs x ceil(18 / 4): each rank saw half the data
    assert out["version"] == "1"


def test_ranks_stop_when_the_flow_process_is_killed(tiny_model_no_dropout, tmp_path):
    """SIGKILL of the CLI (the launcher) mid-training: its torchrun ranks notice and exit instead of training on,
    orphaned; the checkpoint they wrote stays for --resume."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from conftest import write_sentiment_csv
    from tests.integration._servers import clean_env

    csv = write_sentiment_csv(tmp_path, repeat=40)
    env = clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", FINETUNE_CACHE_DIR=str(tmp_path / "c"),
                    FINETUNE_MLFLOW_STORE=str(tmp_path / "store"), PREFECT_HOME=str(tmp_path / "prefect"))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "flows.cli", "classify", "--dataset", csv, "--text-column", "review",
           "--label-column", "sentiment", "--model", tiny_model_no_dropout, "--no-freeze-embeddings", "--max-length", "32",
           "--batch-size", "4",
           "--epochs", "20", "--output-dir", str(out), "--nproc-per-node", "2", "--checkpoint-every-steps", "20"]
    proc = subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ranks: list = []
    while len(ranks) < 2 or not list(out.glob("classify/*/checkpoints/step-*")):
        assert proc.poll() is None
        if len(ranks) < 2:
            ranks = [c for c in psutil.Process(proc.pid).children(recursive=True)
                     if "tasks.distributed" in " ".join(c.cmdline()) and "torch.distributed.run" not in c.cmdline()]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    gone, alive = psutil.wait_procs(ranks, timeout=60)
    assert not alive, [p.cmdline() for p in alive]
    assert list(out.glob("classify/*/checkpoints/step-*"))
