"""Expected errors, for real: `finetune` and deployments/trigger.py run as subprocesses with bad input (config,
data, model) exit 2 with exactly one `error:` line and no traceback. Problems that need no Prefect are found before
Prefect's temporary server starts (its start line never appears); a problem only the flow can find still ends in
one line, with the traceback in the debug log (on the terminal with --verbose)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREFECT_STARTED = "Starting temporary server"


def env_for(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_"))}
    return {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "FINETUNE_CACHE_DIR": str(tmp / "cache"),
            "FINETUNE_MLFLOW_STORE": str(tmp / "store"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT), **extra}


def run(args: list[str], tmp: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env_for(tmp, **env), cwd=ROOT, timeout=300)


def finetune(tmp: Path, *args: str, **env) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "flows.cli", *args], tmp, **env)


def one_error_line(p: subprocess.CompletedProcess) -> str:
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    return errors[0]


def write_csv(path: Path, rows: list[tuple]) -> str:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        w.writerows(rows)
    return str(path)


@pytest.fixture
def base(sentiment_csv, tiny_model_dir, tmp_path) -> list[str]:
    return ["--dataset", sentiment_csv, "--text-column", "review", "--label-column", "sentiment",
            "--model", tiny_model_dir, "--max-length", "16", "--output-dir", str(tmp_path / "out")]


def test_invalid_yaml_is_one_line_before_prefect(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    p = finetune(tmp_path, "classify", "--config", str(bad))
    line = one_error_line(p)
    assert "not valid YAML at line 3" in line and str(bad) in line
    assert PREFECT_STARTED not in p.stderr + p.stdout


@pytest.mark.parametrize("case", ["missing-file", "missing-column", "single-class", "missing-labels", "mixed-labels",
                                  "num-labels", "max-length", "unknown-model", "hub-dataset-offline"])
def test_pre_checkable_problems_are_found_before_prefect(case, base, tmp_path, tiny_model_dir):
    args = list(base)

    def set_flag(flag: str, value: str) -> None:
        args[args.index(flag) + 1] = value

    expect = {
        "missing-file": "not found", "missing-column": "'nope'", "single-class": "single class",
        "missing-labels": "missing values", "mixed-labels": "mixes types", "num-labels": "num_labels=3",
        "max-length": "position limit of 128", "unknown-model": "could not load model",
        "hub-dataset-offline": "could not load Hub dataset 'nosuch/dataset'",
    }[case]
    if case == "missing-file":
        set_flag("--dataset", str(tmp_path / "missing.csv"))
    elif case == "missing-column":
        set_flag("--text-column", "nope")
    elif case == "single-class":
        set_flag("--dataset", write_csv(tmp_path / "one.csv", [("good film", "pos"), ("fine film", "pos")]))
    elif case == "missing-labels":
        set_flag("--dataset", write_csv(tmp_path / "gap.csv", [("good film", "1"), ("bad film", "")]))
    elif case == "mixed-labels":
        (tmp_path / "mixed.jsonl").write_text('{"review": "good", "sentiment": 1}\n{"review": "bad", "sentiment": "neg"}\n')
        set_flag("--dataset", str(tmp_path / "mixed.jsonl"))
    elif case == "num-labels":
        args += ["--num-labels", "3"]
    elif case == "max-length":
        set_flag("--max-length", "1000")
    elif case == "unknown-model":
        set_flag("--model", str(tmp_path / "no-model"))
        os.makedirs(tmp_path / "no-model")
    elif case == "hub-dataset-offline":
        set_flag("--dataset", "nosuch/dataset")
    p = finetune(tmp_path, "classify", *args)
    line = one_error_line(p)
    assert expect in line, line
    assert PREFECT_STARTED not in p.stdout + p.stderr  # found before Prefect's temporary server started


def test_mlm_max_length_before_prefect(tmp_path, tiny_model_dir, sentiment_csv):
    p = finetune(tmp_path, "mlm", "--dataset", sentiment_csv, "--text-column", "review", "--model", tiny_model_dir,
                 "--max-length", "512")
    assert "position limit" in one_error_line(p)
    assert PREFECT_STARTED not in p.stdout + p.stderr


def test_error_only_the_flow_finds_is_one_line_traceback_in_debug_log(tmp_path, tiny_model_dir):
    """Empty texts with `--empty-text error` are found by the flow's load step: Prefect ran, the terminal still shows
    one `error:` line and no traceback; the traceback is in the debug log, and on the terminal with --verbose."""
    data = write_csv(tmp_path / "empty.csv", [("good film", "pos"), ("", "neg"), ("bad film", "neg"), ("fine", "pos")])
    args = ["classify", "--dataset", data, "--text-column", "review", "--label-column", "sentiment", "--model",
            tiny_model_dir, "--max-length", "16", "--empty-text", "error", "--output-dir", str(tmp_path / "out")]
    p = finetune(tmp_path, *args)
    assert "empty or null text" in one_error_line(p)
    assert PREFECT_STARTED in p.stdout + p.stderr  # this one needed the flow
    log = (tmp_path / "cache" / "logs" / "finetune-debug.log").read_text()
    assert "Traceback" in log and "empty or null text" in log

    p = finetune(tmp_path, "--verbose", *args)
    assert p.returncode == 2 and "Traceback" in p.stderr


def test_trigger_bad_inputs_are_one_line(tmp_path, sentiment_csv):
    trigger = [sys.executable, str(ROOT / "deployments" / "trigger.py")]
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {dataset: x\n")
    assert "not valid YAML" in one_error_line(run([*trigger, "retrain-classify", "--config", str(bad)], tmp_path))
    assert "unknown deployment" in one_error_line(run([*trigger, "no-such-deployment"], tmp_path))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{dataset: {sentiment_csv}, text_column: nope, label_column: sentiment}}\n")
    assert "'nope'" in one_error_line(run([*trigger, "retrain-classify", "--config", str(cfg)], tmp_path))
    # --no-check: the data problem is left to the worker; no server answers here: still one line
    p = run([*trigger, "retrain-classify", "--config", str(cfg), "--no-check"], tmp_path,
            PREFECT_API_URL="http://127.0.0.1:9/api")
    assert "does not answer" in one_error_line(p)


@pytest.mark.parametrize("args,expect", [
    (["predict", "--registered-model", "nosuch", "hello"], "could not find models:/nosuch@champion"),
    (["predict", "--registered-model", "m", "--file", "BINARY"], "not UTF-8"),
    (["predict", "--registered-model", "m", "--file", "MISSING"], "not found"),
    (["compare", "--registered-model", "nosuch"], "not found"),
    (["promote", "--registered-model", "nosuch", "--version", "1"], "not found"),
    (["rollback", "--registered-model", "nosuch"], "nosuch"),
    (["access", "grant", "--user", "u", "--experiment", "e", "--permission", "READ"], "tracking server"),
])
def test_other_subcommands_bad_input_one_line(args, expect, tmp_path):
    binary = tmp_path / "texts.bin"
    binary.write_bytes(b"\xff\xfe\x00bad")
    args = [str(binary) if a == "BINARY" else str(tmp_path / "missing.txt") if a == "MISSING" else a for a in args]
    p = finetune(tmp_path, *args)
    assert expect in one_error_line(p)
    assert PREFECT_STARTED not in p.stdout + p.stderr


def test_unreachable_hub_switches_to_offline_after_one_attempt(monkeypatch):
    """One refused connection and the process works from the local cache (no retries with backoff); a proxy or
    an explicit HF_HUB_OFFLINE is left alone."""
    from tasks.common import is_hub_id, offline_unless_hub_reachable

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert offline_unless_hub_reachable(timeout=2) is True
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert offline_unless_hub_reachable(timeout=2) is False and "HF_HUB_OFFLINE" not in os.environ
    assert is_hub_id("bert-base-uncased") and not is_hub_id("bundled-minilm") and not is_hub_id("./model")
