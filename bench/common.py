"""What the whole-job benchmarks share: running a `finetune <job>` command cold and reading its MLflow run, the job's
config parsed by the CLI's own generated command, the peers to compare with, and (for the plain Trainer scripts)
the job's step-cost recipe as flags, so that a peer can train the same way (`--peers same`)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PEERS = {"stock": "HF Trainer script", "same": "HF Trainer, job's recipe"}
PEERS_HELP = ("comma-separated Trainer scripts to run: stock (the checkpoint's dropout, embeddings trained, default "
              "attention, random batches: what a user writes) and/or same (the job's dropout, frozen embeddings, "
              "training attention and length grouping: separates the recipe from the engineering)")


def chosen_peers(ap, value: str) -> list[str]:
    chosen = [p.strip() for p in value.split(",") if p.strip()]
    if not chosen or any(p not in PEERS for p in chosen):
        ap.error(f"--peers takes stock and/or same, got {value!r}")
    return chosen


def run_job(job: str, flags: list[str], tmp: Path, registered_model: str):
    """`finetune <job>` from ROOT (this checkout's code) with a fresh cache dir and MLflow store, as a user's first
    run; returns (wall seconds, its MLflow run)."""
    env = {**os.environ, "FINETUNE_CACHE_DIR": str(tmp / "cache"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
           "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", job, "--output-dir", str(tmp / "out"),
                           "--registered-model", registered_model, *flags],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"finetune {job} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    return seconds, run


def job_config(job: str, flags: list[str]):
    """The job's resolved config for these flags, parsed by the CLI's own generated command."""
    from flows.cli import job_command, overrides_from
    from flows.config import build_config, config_class

    cls = config_class(job)
    cmd = job_command(job, cls)
    ctx = cmd.make_context(job, list(flags))
    return build_config(cls, ctx.params.get("config"), overrides_from(ctx, cmd.params))


def recipe_flags(t) -> list[str]:
    """The job's step-cost choices (TrainConfig `t`) as the peer scripts' flags (see `add_recipe_args`)."""
    from tasks.device import amp_dtype, select_device
    from tasks.training import training_attention

    device = select_device(t.device)
    attention = training_attention(t, device, amp_dtype(device, t.precision))
    return [*(["--dropout", str(t.dropout)] if t.dropout is not None else []),
            *(["--freeze-embeddings"] if t.freeze_embeddings else []),
            *(["--attention", attention] if attention else []),
            *(["--group-by-length"] if t.group_by_length else [])]


def run_peer(script: str, data_path: str, cfg, out: Path, same_recipe: bool, extra: list[str] = ()) -> tuple[float, dict]:
    """Runs a peer Trainer script (bench/<script>) on the prepared data with the job's training settings (and its
    step-cost recipe with `same_recipe`); returns (wall seconds, the JSON line it printed)."""
    import json

    from tasks.base_model import resolve_model

    t = cfg.train
    cmd = [sys.executable, str(ROOT / "bench" / script), data_path, resolve_model(t.model), str(out),
           "--epochs", str(t.epochs), "--batch-size", str(t.batch_size), "--eval-batch-size", str(t.eval_batch_size),
           "--max-length", str(cfg.data.max_length), "--learning-rate", str(t.learning_rate),
           "--warmup-ratio", str(t.warmup_ratio), "--weight-decay", str(t.weight_decay), "--lr-scheduler",
           t.lr_scheduler, "--max-grad-norm", str(t.max_grad_norm), "--seed", str(t.seed),
           "--precision", {"auto": "auto", "bf16": "bf16"}.get(t.precision, "fp32"), *extra,
           *(recipe_flags(t) if same_recipe else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{script} failed:\n{proc.stderr[-3000:]}")
    return seconds, json.loads(proc.stdout.strip().splitlines()[-1])


# --- for the peer scripts (plain Trainer scripts: they import nothing else from this project) -------------------


def add_train_args(ap, learning_rate: float) -> None:
    """The peer scripts' shared arguments: the prepared data, the model, the output dir and the job's settings."""
    ap.add_argument("data")
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--learning-rate", type=float, default=learning_rate)
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--lr-scheduler", default="linear")
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    add_recipe_args(ap)  # --peers same: the job's dropout, frozen embeddings, attention, grouping


def add_recipe_args(ap) -> None:
    """A stock script keeps the checkpoint's dropout, trains the embeddings, uses the default attention and random
    batches; these flags make a peer train as the job does (bench_*_job.py --peers same)."""
    ap.add_argument("--dropout", type=float, default=None)
    ap.add_argument("--freeze-embeddings", action="store_true")
    ap.add_argument("--attention", choices=["sdpa", "eager"], default=None)
    ap.add_argument("--group-by-length", action="store_true")


def apply_recipe(model, a) -> None:
    import torch

    if a.dropout is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = a.dropout
    if a.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if a.attention:
        model.set_attn_implementation(a.attention)


def native_bf16() -> bool:
    """As the transformers CPU docs advise: bf16 where the CPU computes it natively (AMX or AVX512-BF16)."""
    try:
        return any(f in open("/proc/cpuinfo").read() for f in ("avx512_bf16", "amx_bf16"))
    except OSError:
        return False
