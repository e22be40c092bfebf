"""Data-parallel training under torchrun: the launcher the training task calls and the helpers the training code
asks where its process stands; the per-rank entry point is `__main__.py` (so this module imports no training code).

The flow's process does not train itself when `train.nproc_per_node > 1` (or `train.nnodes > 1`): it runs

    python -m torch.distributed.run --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT] \
        -m tasks.distributed --spec spec.json --tokenized DIR --run-dir DIR [--run-id ID] --result result.json

as a subprocess, and the exit code decides the task's state (non-zero: the task fails, and its Prefect retry resumes
from the last checkpoint). Ranks get paths and ids, never objects. Each rank reads its own shard of the training set
(torch's DistributedSampler, seeded, reshuffled per epoch); the plain loop wraps the model in
DistributedDataParallel (gradients all-reduced), the HF Trainer and TRL's SFTTrainer do the same themselves. Only
rank 0 evaluates (the row is broadcast so every rank agrees on early stopping), logs to MLflow (into the flow's run,
whose id is passed in), and writes the model dir and the result; of a checkpoint every rank writes its own
RNG states and rank 0 the rest (tasks/checkpoint.py). The global batch is the per-rank
`train.batch_size` times the number of processes (times `train.gradient_accumulation_steps`). Backend: nccl when
CUDA is available, gloo otherwise; the plain loop runs on accelerate, which joins this process group. The group's
timeout (FINETUNE_DIST_TIMEOUT_MINUTES, default 120) bounds how long the other ranks wait while rank 0 evaluates or
checkpoints. A rank that stops on bad settings (a ConfigError, e.g. a diverged loss) writes its one-line message
beside the result; the launcher raises it as a ConfigError (the task fails without a retry).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tasks.common import ConfigError, run_logger, write_json_atomic
from tasks.training import TrainResult

if TYPE_CHECKING:
    from tasks.jobs import JobSpec


# --- where a process stands ------------------------------------------------------------------------------------


def requested(train_cfg) -> bool:
    """The config asks for more than one process."""
    return train_cfg.nproc_per_node > 1 or train_cfg.nnodes > 1


def is_worker() -> bool:
    """This process is one of torchrun's ranks (torchrun sets these for every rank it starts)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    """A process group is up (a rank of a data-parallel run)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or a plain single process: the one that logs, checkpoints and saves."""
    return rank() == 0


def backend(device_pref: str = "auto") -> str:
    """The process group's backend; before one is up, the one for `device_pref`: nccl on CUDA GPUs, gloo on
    the CPU."""
    import torch
    import torch.distributed as dist

    if active():
        return dist.get_backend()
    return "nccl" if device_pref in ("auto", "cuda") and torch.cuda.is_available() else "gloo"


# --- what the training loop needs ------------------------------------------------------------------------------


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    """Each value summed over all ranks (e.g. a loss sum and a sample count: the epoch's global mean)."""
    if not active():
        return tuple(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                     device="cuda" if backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return tuple(t.tolist())


def timeout():
    """The process group's timeout: longer than rank 0's longest evaluation or checkpoint, while the others wait."""
    from datetime import timedelta

    return timedelta(minutes=float(os.environ.get("FINETUNE_DIST_TIMEOUT_MINUTES") or 120))


def rank_seed(seed: int, rank: int) -> int:
    """The seed of what must differ between ranks (MLM masks, dropout): rank 0 keeps the run's seed, so one
    process draws as before; initialisation and shuffling keep the run's seed on every rank."""
    return seed + 1000 * rank


def loader_options(device_type: str, processes: int = 1) -> dict:
    """DataLoader settings for the device: on CUDA, worker processes collate (and the MLM collator masks, seeded
    per worker) while the GPU runs the step, into pinned memory for asynchronous copies; on the CPU none (workers
    would compete with the step for the same cores)."""
    if device_type != "cuda":
        return {}
    workers = max(1, min(4, (os.cpu_count() or 2) // max(processes, 1) - 1))
    return {"num_workers": workers, "pin_memory": True, "persistent_workers": True}


def main_then_broadcast(fn: Callable[..., dict]) -> Callable[..., dict]:
    """`fn` (an evaluation) runs on rank 0 only; every rank gets its result, so decisions taken from it (the
    best epoch, early stopping) are the same everywhere."""
    if not active():
        return fn

    def run(*args, **kwargs) -> dict:
        import torch.distributed as dist

        box = [fn(*args, **kwargs) if is_main() else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    return run


def shard_train_loader(loaders: dict, seed: int, batch_size: int | None = None, num_replicas: int | None = None,
                       rank: int | None = None, **loader_kwargs) -> dict:
    """The train loader again, over this rank's shard: a seeded DistributedSampler (same collator; batch size per
    rank). The loop calls `sampler.set_epoch(epoch)`, so each epoch reshuffles the same way on every rank and a
    resumed run replays the interrupted epoch's order. `num_replicas=1, rank=0` gives one process the same
    order a data-parallel run's ranks share out (the reference of a DDP run)."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler
    from transformers.trainer_pt_utils import DistributedLengthGroupedSampler, LengthGroupedSampler

    import torch.distributed as dist

    train = loaders["train"]
    if isinstance(train.sampler, LengthGroupedSampler):
        # Length grouping kept: groups are cut for the global batch, and rank r takes every world-th index, so a
        # global batch holds the same examples whatever the number of processes (the DDP-vs-one-process reference).
        world = num_replicas if num_replicas is not None else dist.get_world_size()
        sampler = DistributedLengthGroupedSampler((batch_size or train.batch_size) * world, num_replicas=num_replicas,
                                                  rank=rank, seed=seed, drop_last=False, lengths=train.sampler.lengths)
    else:
        sampler = DistributedSampler(train.dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                                     drop_last=False)
    # The loader's own generator: each epoch's iterator draws its worker base seed from it, not from the global RNG
    # (dropout's), so a resumed epoch (the generator restored to the epoch's start, see fit_manual) leaves dropout
    # where the uninterrupted run had it (measured: without it a resumed 2-process MLM run drifted from the
    # uninterrupted one).
    import torch

    r = rank if rank is not None else dist.get_rank()
    gen = torch.Generator().manual_seed(rank_seed(seed, r))
    return {**loaders, "train": DataLoader(train.dataset, batch_size=batch_size or train.batch_size,
                                           sampler=sampler, collate_fn=train.collate_fn, generator=gen,
                                           **loader_kwargs)}


def set_epoch(loader, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


# --- the launcher (the flow's side) ----------------------------------------------------------------------------


def run_id_of(on_metrics: Any) -> str | None:
    """The MLflow run id behind an `on_metrics` callback (tasks.tracking.MetricsLogger, possibly wrapped by a
    callback that keeps it as `.inner`): rank 0 logs into that run."""
    seen = 0
    while on_metrics is not None and seen < 5:
        if isinstance(getattr(on_metrics, "run_id", None), str):
            return on_metrics.run_id
        on_metrics, seen = getattr(on_metrics, "inner", None), seen + 1
    return None


def torchrun_command(train_cfg, entry_args: list[str], rdzv_id: str = "finetune") -> list[str]:
    """`python -m torch.distributed.run ...` for this config: one node on a free local port (--standalone), or
    several nodes meeting at `rdzv_endpoint` (c10d rendezvous, id `rdzv_id`; every node runs the same command)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(train_cfg.nproc_per_node),
           "--nnodes", str(train_cfg.nnodes)]
    if train_cfg.nnodes > 1:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", train_cfg.rdzv_endpoint,
                "--rdzv-id", rdzv_id]
    else:
        cmd += ["--standalone"]
    return [*cmd, "-m", "tasks.distributed", *entry_args]


def launch(spec: "JobSpec", tokenized_path: str, run_dir: str, on_metrics: Callable[[dict, int], None] | None
           ) -> TrainResult:
    """Runs the training step under torchrun and returns rank 0's TrainResult. A non-zero exit raises (the task
    fails; a retry resumes from the last checkpoint)."""
    log = run_logger(__name__)
    t = spec.train
    import torch

    if t.device in ("auto", "cuda") and torch.cuda.is_available() and t.nproc_per_node > torch.cuda.device_count():
        raise ConfigError(f"nproc_per_node={t.nproc_per_node} but this machine has {torch.cuda.device_count()} "
                          f"GPU(s): use --nproc-per-node {torch.cuda.device_count()} (one process per GPU)")
    work = Path(run_dir) / "distributed"
    work.mkdir(parents=True, exist_ok=True)
    spec_file, result_file, metrics_file = work / "spec.json", work / "result.json", work / "metrics.jsonl"
    write_json_atomic(spec_file, spec.model_dump(mode="json"))
    for stale in (result_file, metrics_file):
        stale.unlink(missing_ok=True)
    run_id = run_id_of(on_metrics)
    args = ["--spec", str(spec_file), "--tokenized", str(tokenized_path), "--run-dir", str(run_dir),
            "--result", str(result_file), *(["--run-id", run_id] if run_id else [])]
    cmd = torchrun_command(t, args, rdzv_id=run_id or Path(run_dir).name)
    # the command, for the record (and, multi-node, what every other node runs: same paths on shared storage)
    write_json_atomic(work / "command.json", {"command": cmd, "tokenized": str(tokenized_path)})
    log.info("data-parallel training: %d process(es) per node x %d node(s), per-rank batch %d%s, global batch %d: %s",
             t.nproc_per_node, t.nnodes, t.batch_size,
             f" x {t.gradient_accumulation_steps} accumulated" if t.gradient_accumulation_steps > 1 else "",
             t.batch_size * t.nproc_per_node * t.nnodes * t.gradient_accumulation_steps, " ".join(cmd[1:]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", LAUNCHER_PID: str(os.getpid())}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // t.nproc_per_node)))
    error_file = work / "error.txt"
    error_file.unlink(missing_ok=True)
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0 and error_file.exists():  # bad settings seen by a rank: one line, no retry
        raise ConfigError(error_file.read_text().strip())
    if rc != 0:
        raise RuntimeError(f"torchrun exited with code {rc} (see the ranks' output above); the last complete "
                           f"checkpoint in {run_dir} is where a retry or --resume continues")
    if not result_file.exists():
        raise RuntimeError(f"torchrun exited 0 but rank 0 wrote no result to {result_file}")
    if run_id is None and on_metrics is not None:  # nobody logged yet: hand rank 0's rows to the callback
        for line in metrics_file.read_text().splitlines() if metrics_file.exists() else []:
            row = json.loads(line)
            on_metrics(row["metrics"], row["step"])
    return TrainResult.model_validate_json(result_file.read_text())


# the launcher's pid, passed down to the ranks (`__main__.exit_when_launcher_dies`)
LAUNCHER_PID = "FINETUNE_LAUNCHER_PID"
