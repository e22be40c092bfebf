"""The per-rank entry point, `python -m tasks.distributed` (what torchrun starts): joins the process group, trains
on its shard through the one training core, and (rank 0) writes the result for the launcher
(`tasks.distributed.launch`). Imports no Prefect: a rank reads data and logs metrics through plain modules."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from tasks import tracking
from tasks.common import ConfigError, write_json_atomic
from tasks.distributed import (LAUNCHER_PID, backend, is_main, loader_options, rank, shard_train_loader, timeout,
                               world_size)
from tasks.jobs import JobSpec
from tasks.training import build_loaders, train
from tasks.training.prepare import loader_device_type


def exit_when_launcher_dies(poll_seconds: float = 2.0) -> None:
    """A rank whose launching flow process is gone (SIGKILL, a crash: it cannot stop torchrun then) exits too,
    instead of training on, orphaned; torchrun then stops the other ranks. Only where the launcher's pid was
    passed down (not on the other nodes of a multi-node run, which are started by hand)."""
    import threading
    import time

    pid = int(os.environ.get(LAUNCHER_PID) or 0)
    if pid <= 0:
        return

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass  # alive, another user's

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


class _RankMetrics:
    """Rank 0's `on_metrics`: into the flow's MLflow run (when its id was passed in), and one JSON line per call
    (for a caller without an MLflow run, and a record of what rank 0 reported)."""

    def __init__(self, run_id: str | None, path: Path):
        self.logger = tracking.MetricsLogger(run_id) if run_id else None
        self.path = path

    def __call__(self, metrics: dict, step: int) -> None:
        if self.logger:
            self.logger(metrics, step)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "metrics": metrics}) + "\n")


def main(argv: list[str] | None = None) -> int:
    """One rank: joins the process group, trains on its shard through the one training core, and (rank 0)
    writes the result for the launcher."""
    p = argparse.ArgumentParser(prog="python -m tasks.distributed", description=main.__doc__)
    p.add_argument("--spec", required=True, help="JSON of the JobSpec")
    p.add_argument("--tokenized", required=True, help="the tokenized dataset dir")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--result", required=True, help="where rank 0 writes the TrainResult JSON")
    p.add_argument("--run-id", default=None, help="MLflow run that rank 0 logs metrics into")
    a = p.parse_args(argv)

    # torch here, not at the top: the module is imported (not run) by tools that only list it
    import torch
    import torch.distributed as dist

    # the training core's log lines (resumed from..., epoch rows) on the launcher's console: rank 0's, and every
    # rank's warnings
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format=f"rank {os.environ.get('RANK', '0')}: %(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    exit_when_launcher_dies()
    spec = JobSpec.model_validate_json(Path(a.spec).read_text())
    if backend(spec.train.device) == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per rank: "cuda" means this one
    dist.init_process_group(backend(spec.train.device), timeout=timeout())
    try:
        if is_main() and a.run_id:
            tracking.log_params_once(a.run_id, {
                "train.global_batch_size":
                    spec.train.batch_size * world_size() * spec.train.gradient_accumulation_steps,
                "distributed.world_size": world_size(), "distributed.backend": backend()})
        loaders = build_loaders(a.tokenized, spec, rank=rank())
        loaders = shard_train_loader(loaders, spec.train.seed,
                                     **loader_options(loader_device_type(spec.train), world_size()))
        on_metrics = _RankMetrics(a.run_id, Path(a.result).parent / "metrics.jsonl") if is_main() else None
        try:
            result = train(spec, a.tokenized, a.run_dir, loaders=loaders, on_metrics=on_metrics)
        except ConfigError as e:  # every rank that sees it says the same line; the launcher raises it
            (Path(a.result).parent / "error.txt").write_text(str(e) + "\n")
            logging.getLogger(__name__).error("%s", e)
            return 2
        if is_main():
            write_json_atomic(a.result, result.model_dump(mode="json"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0



if __name__ == "__main__":
    sys.exit(main())
