"""`finetune score --ray-address` against a real two-node Ray cluster on this machine: `ray start --head`, then a
second `ray start --address` node, both on loopback with token authentication (Ray 2.60's default), each node
one CPU; the job's two actors land one per node. The output equals the local path's, row for row."""
from __future__ import annotations

import json
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from _servers import ROOT, VENV_BIN, Proc, clean_env, free_port, register_tiny_scorer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_score_on_a_two_node_ray_cluster_matches_local(tmp_path, tiny_model_dir):
    import pyarrow.parquet as pq

    from tests.conftest import NEGATIVE, POSITIVE

    env = clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", PYTHONPATH=str(ROOT),
                    RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    register_tiny_scorer(env, tmp_path, tiny_model_dir)
    csv = tmp_path / "in.csv"
    pool = POSITIVE + NEGATIVE
    csv.write_text("id,text\n" + "".join(f'{i},"{pool[i % len(pool)]}{" !" * (i % 4)}"\n' for i in range(60)))

    ray = str(VENV_BIN / "ray")
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="rsc", dir="/tmp"))  # short: Ray's socket paths have a length limit
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats", "--block",
              "--temp-dir", str(temp)]
    head = Proc("ray-head", [ray, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                             "--ray-client-server-port", str(free_port()), *common], env, tmp_path)
    node2 = None
    try:
        address = f"127.0.0.1:{port}"
        probe = "import ray; ray.init(address={a!r}); print(sum(1 for n in ray.nodes() if n['Alive']))"
        deadline = time.monotonic() + 180
        nodes = 0
        while time.monotonic() < deadline:
            assert head.alive(), head.tail()
            if node2 is None and (temp / "session_latest").exists():
                node2 = Proc("ray-node2", [ray, "start", "--address", address, *common], env, tmp_path)
            if node2 is not None:
                p = subprocess.run([sys.executable, "-c", probe.format(a=address)], env=env, capture_output=True,
                                   text=True, timeout=120)
                nodes = int(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 and p.stdout.strip() else 0
                if nodes == 2:
                    break
            time.sleep(2)
        assert nodes == 2, f"{head.tail()}\n{node2.tail() if node2 else ''}"

        def score(out: str, *extra: str) -> dict:
            argv = [sys.executable, "-m", "flows.cli", "score", "--registered-model", "it-scorer", "--input", str(csv),
                    "--output", str(tmp_path / out), "--id-columns", "id", "--chunk-rows", "10", "--json", *extra]
            p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
            assert p.returncode == 0, p.stderr[-4000:]
            return json.loads(p.stdout[p.stdout.index("{"):])

        on_cluster = score("cluster.parquet", "--ray-address", address, "--workers", "2")
        local = score("local.parquet")
    finally:
        for proc in (node2, head):
            if proc is not None:
                proc.stop()
    assert on_cluster["engine"] == "ray" and "2 node(s)" in on_cluster["device"], on_cluster["device"]
    a, b = pq.read_table(tmp_path / "local.parquet"), pq.read_table(tmp_path / "cluster.parquet")
    for c in ("row", "id", "skipped", "label"):
        assert a.column(c).to_pylist() == b.column(c).to_pylist(), c
    assert a.column("score").to_pylist() == pytest.approx(b.column("score").to_pylist(), abs=2e-3)
    assert on_cluster["model"] == local["model"] and on_cluster["rows_out"] == 60
