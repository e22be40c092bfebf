"""The one training core for every job: setup -> fit (the plain loop on accelerate, or the job's HF Trainer class)
-> atomic save, returning a typed `TrainResult`. What differs between jobs comes from their recipe
(`tasks/jobs/`); nothing here switches on a job's name."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from tasks import adapters, distributed
from tasks.common import atomic_dir, run_logger, seed_everything, write_json_atomic
from tasks.device import amp_dtype, describe, enable_tf32, select_device
from tasks.evaluate import probe_scores
from tasks.training.config import EvalHook, MetricsFn, TrainResult
from tasks.training.loop import fit_manual
from tasks.training.prepare import (NEW_WEIGHT_NAMES, attention_implementation, build_loaders, model_for_training,
                                    resume_on_retry, training_attention)
from tasks.training.selection import track_best
from tasks.training.trainer import fit_hf

if TYPE_CHECKING:
    from tasks.jobs import JobSpec


def save_model_dir(run: Path, write: Callable[[Path], Any]) -> Path:
    """`write(tmp_dir)`, then renamed to run/model in one step: a full disk leaves the previous model dir and the
    checkpoints intact, with one clear error."""
    final = run / "model"
    with atomic_dir(final) as tmp:
        write(Path(tmp))
    return final


def write_run_files(model_dir: Path, spec: "JobSpec", history: list[dict], final: dict, **selection) -> None:
    """The resolved job spec and the metrics beside the weights: a model dir says what made it (`final` is the
    row of the saved epoch; `selection`: selected_epoch, stopped_early_at)."""
    (model_dir / "config.yaml").write_text(yaml.safe_dump(spec.model_dump(), sort_keys=False))
    (model_dir / "metrics.json").write_text(json.dumps({"history": history, "final": final, **selection}, indent=2))


# --- the core --------------------------------------------------------------------------------------------------

def train(spec: "JobSpec", tokenized_path: str, run_dir: str, loaders: dict | None = None,
          on_metrics: MetricsFn | None = None, on_step: MetricsFn | None = None,
          on_evaluation: EvalHook | None = None) -> TrainResult:
    """setup -> fit (the plain loop for engine `manual`, else the job's Trainer class) -> atomic save, for any job.
    Writes `run_dir/model` (weights or adapter, tokenizer, config.yaml, metrics.json) and `run_dir/eval_extras.json`
    (what the last evaluation returned besides metrics, e.g. predictions for a confusion matrix). `on_metrics` gets
    each epoch's row (step = epoch), `on_step` the `train_loss_step` points (step = optimizer step), `on_evaluation`
    (epoch, metrics) after each epoch's evaluation, and may stop the run by raising (single-process runs only)."""
    log = run_logger(__name__)
    recipe = spec.recipe
    # --- setup: resume on a Prefect retry, run dir, device and precision, seed, model (+ adapters), loaders
    spec = resume_on_retry(spec)
    if distributed.requested(spec.train) and not distributed.is_worker():
        return distributed.launch(spec, tokenized_path, run_dir, on_metrics)  # the ranks run this function
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    device = select_device(spec.train.device)
    dtype = amp_dtype(device, spec.train.precision)
    enable_tf32(device)
    seed_everything(spec.train.seed)  # the same on every rank: the same initialisation
    model, tok = model_for_training(spec, tokenized_path, device)
    if distributed.rank():  # dropout differs between ranks (rank 0 keeps the run's seed: one process as before)
        seed_everything(distributed.rank_seed(spec.train.seed, distributed.rank()))
    trainable, total = adapters.trainable_parameters(model)
    eval_attention = getattr(model.config, "_attn_implementation", None)
    if loaders is None:
        loaders = build_loaders(tokenized_path, spec, tok)
    extras: dict = {}

    @distributed.main_then_broadcast  # data-parallel: rank 0 evaluates, every rank gets the row
    def evaluate_fn(m, desc: str = "eval") -> dict[str, float]:
        with attention_implementation(model, eval_attention):  # the model's own, as when it is served
            r = recipe.evaluate(m, loaders["eval"], device, dtype, desc=desc)
        extras.update({k: v for k, v in r.items() if not isinstance(v, float)})
        return {k: v for k, v in r.items() if isinstance(v, float)}

    # --- epoch 0: the starting point, for jobs whose curves should start before any update
    history: list[dict] = []
    if recipe.eval_before_training:
        epoch0_file = run / "epoch0_metrics.json"
        if spec.train.resume and epoch0_file.exists():
            epoch0 = json.loads(epoch0_file.read_text())
        else:
            epoch0 = {"epoch": 0, **evaluate_fn(model, "eval epoch 0")}
            if distributed.is_main():
                write_json_atomic(epoch0_file, epoch0)
        if on_metrics:
            on_metrics({k: v for k, v in epoch0.items() if k != "epoch"}, 0)
        history.append(epoch0)

    # --- fit (with the attention kernels that train fastest here; evaluation switches back to the model's own)
    with attention_implementation(model, training_attention(spec.train, device, dtype)):
        if spec.engine == "manual":
            out = fit_manual(spec, model, loaders, run, evaluate_fn, on_metrics, device, dtype, on_step, on_evaluation)
        else:
            out = fit_hf(spec, model, tok, tokenized_path, run, evaluate_fn, on_metrics, device, dtype, on_step,
                         on_evaluation)
    history += out.history
    key, higher = spec.selection_metric
    progress = track_best(out.history, key, higher)
    selected = out.selected_epoch if out.selected_epoch is not None else (history[-1]["epoch"] if history else None)
    if spec.train.select == "best" and progress.best_epoch is not None and selected != progress.best_epoch:
        log.warning("the saved weights are epoch %s's, but epoch %s scored best by %s", selected,
                    progress.best_epoch, key)
    last = out.history[-1]["epoch"] if out.history else None
    stopped_early_at = last if last is not None and last < spec.train.epochs else None
    final = next((r for r in history if r["epoch"] == selected), history[-1] if history else {})
    if out.history:
        log.info("saving epoch %s of %s (%s, by %s%s)", selected, last,
                 "the best" if selected == progress.best_epoch else "the last", key,
                 f"; stopped early after epoch {stopped_early_at}" if stopped_early_at else "")
    if selected is not None and selected != last:
        # The evaluation extras (e.g. the confusion matrix's predictions) must describe the saved weights; this
        # also checks that they are that epoch's.
        again = evaluate_fn(model, f"eval epoch {selected} (selected)")
        if not math.isclose(again.get(key, math.nan), final.get(key, math.nan), rel_tol=1e-4, abs_tol=1e-6):
            log.warning("the restored epoch %s evaluates to %s=%s, not %s as during training", selected, key,
                        again.get(key), final.get(key))
    if recipe.eval_before_training and len(history) > 1:
        log.info("eval before -> after: %s", ", ".join(
            f"{k} {history[0][k]:.4f} -> {final[k]:.4f}" for k in recipe.metrics if k in final and k in history[0]))

    # --- save, atomically: a reader sees the previous complete model dir or the new one
    def write(d: Path) -> None:
        if spec.peft == "lora":
            adapters.save_model(model, tok, d)
        else:
            model.save_pretrained(d)
            tok.save_pretrained(d)
        write_run_files(d, spec, history, final, selected_epoch=selected, stopped_early_at=stopped_early_at)

    model_dir = run / "model"
    if distributed.is_main():  # data-parallel: rank 0 saves, the others hold the same weights
        model_dir = save_model_dir(run, write)
        write_json_atomic(run / "eval_extras.json", extras)

    # the saved weights' scores on a few eval rows: promotion checks the logged model against them cheaply
    probe = probe_scores(model, loaders["eval"], spec, device, dtype) if distributed.is_main() else {}
    where = describe(device, dtype)
    if distributed.active():
        where += f" x {distributed.world_size()} processes ({distributed.backend()})"
    return TrainResult(
        model_dir=str(model_dir), history=history, final=final, device=where,
        selected_epoch=selected, best_epoch=progress.best_epoch, selection_metric=key, stopped_early_at=stopped_early_at,
        train_samples_per_second=out.samples_per_second, resumed_from=out.resumed_from,
        trainable_parameters=trainable, total_parameters=total, probe=probe,
        steps_per_epoch=out.steps_per_epoch, new_weights=list(getattr(model, NEW_WEIGHT_NAMES, [])),
    )
