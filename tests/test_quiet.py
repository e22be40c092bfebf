"""Quiet, distinguishable, readable runs, for real: `finetune classify` (plain loop) and `finetune mlm` (TRL's
SFTTrainer) as subprocesses whose output is a pipe, as in a worker's log. One line per epoch, no progress bars, no
ANSI codes, no Trainer dicts, no notice nobody can act on; unique run names; `train_loss_step` points beside the
per-epoch metrics; the predict hint comes from the run's eval data."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import NEGATIVE, POSITIVE

ROOT = Path(__file__).resolve().parents[1]
NOISE = ["it/s]", "examples/s]", "\x1b[", "LOAD REPORT", "model card", "license information", "telemetry",
         "Traceback", "{'loss'", "{'train_runtime'", "'eval_loss':", "newly initialized"]


def finetune(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    from tests.test_errors import env_for

    p = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                       env=env_for(tmp), cwd=ROOT, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p


def mlflow_run(tmp: Path, experiment: str):
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    [run] = c.search_runs([c.get_experiment_by_name(experiment).experiment_id])
    return c, run


def check_quiet(out: str, epochs: int, first_epoch: int = 1) -> None:
    for noise in NOISE:
        assert noise not in out, (noise, out[-4000:])
    assert "\r" not in out  # no bar redraws
    for e in range(first_epoch, epochs + 1):  # one line per epoch: "epoch 1/2 (50%): train_loss=..."
        assert len(re.findall(rf"epoch {e}/{epochs} \(\d+%\): ", out)) == 1, (e, out[-4000:])
    assert not re.search(r"epoch \d+: \{", out)  # the loop's own line comes only without a metrics callback


def test_classify_manual_run_is_quiet_and_readable(sentiment_csv, tiny_model_dir, tmp_path):
    p = finetune(tmp_path, "classify", "--dataset", sentiment_csv, "--text-column", "review", "--label-column",
                 "sentiment", "--model", tiny_model_dir, "--max-length", "16", "--batch-size", "4", "--epochs", "2",
                 "--experiment", "quiet", "--output-dir", str(tmp_path / "out"))
    out = p.stdout + p.stderr
    check_quiet(out, epochs=2)
    c, run = mlflow_run(tmp_path, "quiet")
    # a readable, unique name: the job label and a timestamp with a short id, the same in Prefect and MLflow
    assert re.fullmatch(r"classify-.+-manual-e2-\d{8}-\d{6}-[0-9a-f]{4}", run.info.run_name), run.info.run_name
    assert f"Flow run '{run.info.run_name}'" in out
    # step-level loss: 38 rows / batch 4 = 10 steps an epoch, 20 steps: the default logs every step (>= 20 points)
    steps = c.get_metric_history(run.info.run_id, "train_loss_step")
    assert [m.step for m in sorted(steps, key=lambda m: m.step)] == list(range(1, 21))
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]  # per epoch, as before
    epoch_mean = sum(m.value for m in steps if m.step <= 10) / 10
    [first] = [m for m in c.get_metric_history(run.info.run_id, "train_loss") if m.step == 1]
    assert first.value == pytest.approx(epoch_mean, rel=0.2)  # batch-weighted vs step mean: same ballpark
    assert "eval/loss_curve.png" in [f.path for f in c.list_artifacts(run.info.run_id, "eval")]
    # the predict hint is a text of the run's own data, quoted for the shell
    [hint] = [ln for ln in p.stdout.splitlines() if "predict with:" in ln]
    assert any(f"'{t}'" in hint for t in POSITIVE + NEGATIVE), hint


def test_mlm_trainer_run_is_quiet_and_readable(sentiment_csv, tiny_model_dir, tmp_path):
    p = finetune(tmp_path, "mlm", "--dataset", sentiment_csv, "--text-column", "review", "--model", tiny_model_dir,
                 "--max-length", "16", "--batch-size", "2", "--epochs", "2", "--logging-steps", "3",
                 "--experiment", "quiet-mlm", "--output-dir", str(tmp_path / "out"))
    out = p.stdout + p.stderr
    check_quiet(out, epochs=2, first_epoch=0)
    summary = p.stdout[p.stdout.index("== mlm finished =="):]
    assert "{" not in summary  # no Trainer dicts in the summary
    c, run = mlflow_run(tmp_path, "quiet-mlm")
    steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "train_loss_step"))
    # 15 blocks / batch 2 = 8 steps an epoch: every 3 steps, plus each epoch's end (so epochs never share a window)
    assert steps == [3, 6, 8, 9, 12, 15, 16], steps
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    [hint] = [ln for ln in p.stdout.splitlines() if "predict with:" in ln]
    masked = re.search(r"'(.*\[MASK\].*)'", hint).group(1)
    assert any(masked.split("[MASK]")[0].strip() in t for t in POSITIVE + NEGATIVE), hint


def test_unique_run_names():
    from flows.common import unique_run_name

    assert unique_run_name("classify-x") != unique_run_name("classify-x")


def test_step_losses_make_exact_epoch_means():
    """Trainer's loss logs (mean of the steps since the previous one) at steps 3, 5 (epoch end), 8, 10 (epoch end)."""
    from tasks.training import history_from_trainer

    logs = [{"loss": 1.0, "epoch": 0.6, "step": 3}, {"loss": 2.0, "epoch": 1.0, "step": 5},
            {"eval_loss": 0.5, "epoch": 1.0, "step": 5},
            {"loss": 3.0, "epoch": 1.6, "step": 8}, {"loss": 5.0, "epoch": 2.0, "step": 10},
            {"eval_loss": 0.4, "epoch": 2.0, "step": 10}, {"train_loss": 9.0, "epoch": 2.0, "step": 10}]
    rows = history_from_trainer(logs, ("eval_loss",))
    assert rows == [{"epoch": 1, "train_loss": pytest.approx((3 * 1 + 2 * 2) / 5), "eval_loss": 0.5},
                    {"epoch": 2, "train_loss": pytest.approx((3 * 3 + 2 * 5) / 5), "eval_loss": 0.4}]


def test_loss_log_every_default_gives_20_points():
    from tasks.training import TrainConfig, loss_log_every

    for total in (7, 20, 21, 188, 1000, 12345):
        every = loss_log_every(TrainConfig(), total)
        assert total // every >= min(20, total)
    assert loss_log_every(TrainConfig(logging_steps=7), 1000) == 7
