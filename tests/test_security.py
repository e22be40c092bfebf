"""Credentials never shown or recorded, refusals (401/403) never retried and reported as one line naming the
permission, checkpoints loadable with torch.load(weights_only=True)."""
from __future__ import annotations

import time

import pytest

from tasks import tracking


def test_redact_uri():
    r = tracking.redact_uri
    assert r("http://alice:s3cret@host:5000/x") == "http://alice:***@host:5000/x"
    assert r("see postgresql://u:p%40ss@db/mlflow and https://h/x?token=abc&a=1") == \
        "see postgresql://u:***@db/mlflow and https://h/x?token=***&a=1"
    assert r("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_display_uri_and_links_redact(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:hunter2@127.0.0.1:1")
    assert "hunter2" not in tracking.display_uri()
    from flows import monitoring

    monkeypatch.setattr(tracking, "client", lambda: (_ for _ in ()).throw(RuntimeError("offline")))
    text, url = monitoring.mlflow_run_link("abc")
    assert "hunter2" not in text and "hunter2" not in url and "bob:***@" in url


def _refusal(code: str):
    from mlflow.exceptions import MlflowException

    e = MlflowException("Permission denied")
    e.error_code = code
    return e


def test_refusals_are_not_retried(monkeypatch):
    monkeypatch.setenv("FINETUNE_MLFLOW_RETRY_SECONDS", "30")
    calls = []

    def denied():
        calls.append(1)
        raise _refusal("PERMISSION_DENIED")

    with pytest.raises(Exception):
        tracking._retry(denied)
    assert calls == [1]  # refused once, not retried
    assert tracking.auth_status(_refusal("UNAUTHENTICATED")) == 401 and tracking.auth_status(ValueError()) is None


def test_refusal_names_the_permission(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "server")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:pw@127.0.0.1:1")
    with pytest.raises(tracking.AccessDenied) as ei:
        with tracking.on_model("m", "EDIT"):
            raise _refusal("PERMISSION_DENIED")
    msg = str(ei.value)
    assert "'server' lacks EDIT permission on registered model 'm'" in msg and "--permission EDIT" in msg
    assert "pw@" not in msg and "\n" not in msg


def test_cli_prints_one_line_for_a_refusal(monkeypatch, capsys):
    from flows import cli, manage
    from tasks import registry

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "server")
    monkeypatch.setattr(tracking, "check_remote", lambda *a, **k: "")
    monkeypatch.setattr(registry, "alias_version", lambda *a: "1")
    monkeypatch.setattr(registry, "get_version", lambda *a: object())

    def set_alias(name, alias, version):
        with tracking.on_model(name, "EDIT"):
            raise _refusal("PERMISSION_DENIED")

    monkeypatch.setattr(registry, "set_alias", set_alias)
    monkeypatch.setattr(manage, "registry_lock", None, raising=False)
    assert cli.main(["promote", "--registered-model", "m", "--version", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "lacks EDIT permission" in err and "Traceback" not in err


def test_checkpoint_loads_with_weights_only(tmp_path):
    import random

    import numpy as np
    import torch

    from tasks.checkpoint import load_latest_checkpoint, save_checkpoint, set_rng_state
    from tests.legacy_checkpoint import rng_state, write_single_file

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    st = rng_state()
    save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(2)}, "rng": st, "history": [{"epoch": 1, "loss": 0.5}]})
    torch.load(tmp_path / "step-00000001" / "loop_state.pt", weights_only=True)  # plain content: no allowlist needed
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    _, loaded = load_latest_checkpoint(tmp_path)
    set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    # a checkpoint of the single-file format, numpy state as an ndarray (its oldest form), still loads safely
    old = {"rng": {**st, "numpy": np.random.get_state()}}
    write_single_file(tmp_path, 2, old)
    assert load_latest_checkpoint(tmp_path)[0].name == "step-00000002"


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    import collections

    from tasks.checkpoint import load_latest_checkpoint, save_checkpoint

    save_checkpoint(tmp_path, 1, {"x": collections.Counter(a=1), "f": time.struct_time((2020,) * 9)})
    assert load_latest_checkpoint(tmp_path) is None  # refused (skipped with a warning), never unpickled
