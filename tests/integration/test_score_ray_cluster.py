"""`finetune score --ray-address` against a real two-node Ray cluster on this machine: `ray start --head`, then a
second `ray start --address` node, both on loopback with token authentication (Ray 2.60's default), each node
one CPU; the job's two actors land one per node. The output equals the local path's, row for row."""
from __future__ import annotations

import json
import secrets
import subprocess
import sys

import pytest

from _servers import ROOT, clean_env, register_tiny_scorer, two_node_ray_cluster

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

    with two_node_ray_cluster(env, tmp_path, "rsc") as address:

        def score(out: str, *extra: str) -> dict:
            argv = [sys.executable, "-m", "flows.cli", "score", "--registered-model", "it-scorer", "--input", str(csv),
                    "--output", str(tmp_path / out), "--id-columns", "id", "--chunk-rows", "10", "--json", *extra]
            p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
            assert p.returncode == 0, p.stderr[-4000:]
            return json.loads(p.stdout[p.stdout.index("{"):])

        on_cluster = score("cluster.parquet", "--ray-address", address, "--workers", "2")
        local = score("local.parquet")
    assert on_cluster["engine"] == "ray" and "2 node(s)" in on_cluster["device"], on_cluster["device"]
    a, b = pq.read_table(tmp_path / "local.parquet"), pq.read_table(tmp_path / "cluster.parquet")
    for c in ("row", "id", "skipped", "label"):
        assert a.column(c).to_pylist() == b.column(c).to_pylist(), c
    assert a.column("score").to_pylist() == pytest.approx(b.column("score").to_pylist(), abs=2e-3)
    assert on_cluster["model"] == local["model"] and on_cluster["rows_out"] == 60
