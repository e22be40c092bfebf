"""Batch scoring on Ray Data (`finetune score --workers N` / `--ray-address`): the local path's chunk reader and
scorer, spread out. One read task yields the input's chunks in order (the local path's chunks, already scored
ones skipped), a strict streaming repartition keeps one chunk per block, and `map_batches` with an actor pool
scores them, each actor loading the model once
(`cpus_per_worker` / `gpus_per_worker` each); the driver receives positions + ids + predictions (small) and
writes each chunk's part as soon as the chunk is complete, so output, resume and the final file are the local
path's. Each chunk is scored on its own inside an actor, so its batches are the local path's batches.

On a cluster every node needs this project installed (same versions) and the input files at the same path (a
shared file system or object store mount); the driver passes MLFLOW_TRACKING_URI and PYTHONPATH to the actors."""
from __future__ import annotations

import os
from typing import Callable

from tasks.scoring import _CHUNK, _N, InputPlan, ModelRef, ScoreConfig

# what the actors need from this process's environment (runtime_env env_vars)
PASS_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
            "PYTHONPATH", "HF_HUB_OFFLINE", "HF_HOME", "FINETUNE_CACHE_DIR", "TOKENIZERS_PARALLELISM",
            "TRANSFORMERS_VERBOSITY", "TQDM_DISABLE", "FINETUNE_VERBOSE")


def _read_chunks(batch, plan: InputPlan, chunk_rows: int, skip: set):
    """Ray Data UDF: the whole input's chunks, in order, one at a time (a generator)."""
    from tasks.scoring import iter_chunks

    for _, table in iter_chunks(plan, chunk_rows, skip=skip):
        yield table


class _ScoreActor:
    """Ray Data actor: the model once, then whole chunks scored as on the local path."""

    def __init__(self, model_uri: str, cfg: ScoreConfig):
        from tasks.scoring import Scorer

        self.scorer = Scorer(model_uri, cfg)

    def __call__(self, table):
        return self.scorer.score_chunks(table)


def _init_ray(cfg: ScoreConfig) -> bool:
    """Connects to `ray_address` or starts a local Ray sized for the actors; True when this call started it."""
    import ray

    from tasks import output, tracking

    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if ray.is_initialized():
        return False
    output.quiet_ray()
    kw: dict = {"runtime_env": {"env_vars": env}, "include_dashboard": False, "log_to_driver": False,
                "configure_logging": False}
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, **kw)
    else:
        workers = cfg.workers or 1
        kw["num_cpus"] = max(1, int(-(-workers * cfg.cpus_per_worker // 1)))
        if cfg.gpus_per_worker:
            kw["num_gpus"] = int(-(-workers * cfg.gpus_per_worker // 1))
        ray.init(**kw)
    return True


def cluster_description() -> str:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)
    gpus = sum(n.get("Resources", {}).get("GPU", 0) for n in nodes)
    return f"{len(nodes)} node(s), {cpus:g} CPU, {gpus:g} GPU"


def score_on_ray(cfg: ScoreConfig, plan: InputPlan, ref: ModelRef, skip: set,
                 on_part: Callable[[object], None]) -> str:
    """Scores every chunk not in `skip`; calls `on_part(table)` with each completed chunk (positions, ids,
    predictions). Returns a description of where it ran."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    started = _init_ray(cfg)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        workers = cfg.workers or max(1, int(sum(n.get("Resources", {}).get("CPU", 0) for n in ray.nodes()
                                                if n.get("Alive")) // cfg.cpus_per_worker))
        ctx.execution_options.preserve_order = True  # the chunk stream stays in order, so blocks = chunks
        ds = ray.data.from_items([{"input": 0}], override_num_blocks=1)
        # reading is I/O and parsing: no CPU reserved, so the actors can take every CPU of the cluster
        ds = ds.map_batches(_read_chunks, fn_kwargs={"plan": plan, "chunk_rows": cfg.chunk_rows, "skip": skip},
                            batch_size=1, batch_format="pyarrow", num_cpus=0)
        # one block per chunk: every chunk but the last has exactly chunk_rows rows, in order
        ds = ds.repartition(target_num_rows_per_block=cfg.chunk_rows, strict=True)
        # Re-slicing blocks is cheap, but its tasks ask for a CPU by default, which the actors may all hold (a
        # deadlock on a cluster sized for them); repartition() takes no resource arguments, so set them on its op.
        try:
            ds._logical_plan.dag.ray_remote_args.update(num_cpus=0)
        except AttributeError:  # another Ray version: keep its default and say what it needs
            import logging

            logging.getLogger(__name__).warning(
                "could not free Ray Data's repartition step from its CPU request: leave one CPU of the cluster "
                "beyond the scoring actors (--workers x --cpus-per-worker)")
        ds = ds.map_batches(_ScoreActor, fn_constructor_args=(ref.uri, cfg), batch_size=None,
                            batch_format="pyarrow", concurrency=workers, num_cpus=cfg.cpus_per_worker,
                            num_gpus=cfg.gpus_per_worker or None)
        pending: dict[int, list] = {}
        for t in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for ci in sorted(set(t.column(_CHUNK).to_pylist())):
                piece = t.filter(pc.equal(t[_CHUNK], ci))
                pending.setdefault(ci, []).append(piece)
                if sum(len(p) for p in pending[ci]) == piece.column(_N)[0].as_py():
                    on_part(pa.concat_tables(pending.pop(ci)))
        if pending:
            raise RuntimeError(f"Ray returned incomplete chunks {sorted(pending)}")
        return f"Ray: {workers} actor(s) on {cluster_description()}"
    finally:
        if started:
            ray.shutdown()
