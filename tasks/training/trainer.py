"""The Trainer adapter: the job's HF Trainer class (transformers.Trainer, TRL's SFTTrainer subclass, ...) driven by
the same config, data, evaluation and epoch selection as the plain loop."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from tasks import distributed
from tasks.checkpoint import _collator_rngs, collator_rng_state, set_collator_rng_state
from tasks.distributed import loader_options
from tasks.loaders import epoch_seeded_length_sampler, example_lengths
from tasks.output import progress_bars
from tasks.training.config import STEP_LOSS, EvalHook, FitOutput, MetricsFn, TrainConfig, loss_log_every
from tasks.training.loop import diverged
from tasks.training.optim import (build_optimizer, check_optimizer_groups, global_steps_per_epoch, group_sizes,
                                  warmup_steps)
from tasks.training.prepare import fused_adamw_supported, spec_for_rank
from tasks.training.selection import track_best

if TYPE_CHECKING:
    from tasks.jobs import JobSpec

log = logging.getLogger(__name__)


def hf_training_kwargs(t: TrainConfig, steps_per_epoch: int, device, dtype, processes: int = 1) -> dict:
    """The TrainingArguments fields TrainConfig maps onto, for every job's Trainer class: evaluate and checkpoint
    once per epoch (checkpoints are what --resume continues from), log the loss every `loss_log_every` steps (and at
    each epoch end, see `fit_hf`); Trainer's bars only on a terminal."""
    import torch

    return dict(
        num_train_epochs=t.epochs, per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay,
        warmup_steps=warmup_steps(t, steps_per_epoch), lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm, seed=t.seed, data_seed=t.seed, eval_strategy="epoch",
        logging_strategy="steps", logging_steps=loss_log_every(t, steps_per_epoch * t.epochs),
        save_strategy="epoch", save_total_limit=2, report_to="none", disable_tqdm=not progress_bars(),
        logging_nan_inf_filter=False,  # a diverged loss is logged as such (and stops the run), not averaged away
        use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        **hf_loader_kwargs(device, processes), train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        optim="adamw_torch_fused" if fused_adamw_supported(device) else "adamw_torch",
    )


def hf_loader_kwargs(device, processes: int = 1) -> dict:
    """`tasks.distributed.loader_options` as TrainingArguments fields: workers and pinned memory on CUDA only."""
    o = loader_options(device.type, processes)
    return {"dataloader_num_workers": o.get("num_workers", 0), "dataloader_pin_memory": o.get("pin_memory", False),
            "dataloader_persistent_workers": o.get("persistent_workers", False)}


def with_seeded_length_groups(trainer_cls: type, seed: int) -> type:
    """The Trainer class with length-grouped batches in an order fixed by (seed, epoch): resumable (see
    `tasks.loaders.epoch_seeded_length_sampler`)."""
    class SeededLengthGroups(trainer_cls):
        def _get_train_sampler(self, train_dataset=None):
            ds = train_dataset if train_dataset is not None else self.train_dataset
            return epoch_seeded_length_sampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                               example_lengths(ds), seed,
                                               epoch_of=lambda: int((self.state.epoch or 0) + 1e-6))

    SeededLengthGroups.__name__ = SeededLengthGroups.__qualname__ = trainer_cls.__name__
    return SeededLengthGroups


def trainer_metric_name(key: str) -> str:
    """The name Trainer reads a metric under (it prefixes `eval_` to metric_for_best_model when missing)."""
    return key if key.startswith("eval_") else f"eval_{key}"


def with_job_evaluation(trainer_cls: type, evaluate_fn) -> type:
    """The job's Trainer class with `evaluate` replaced by the job's own evaluation (the function the plain loop
    and promotion call, on the same eval loader). Trainer still schedules it, logs it into its state (so resume
    keeps the history) and fires `on_evaluate`."""

    class JobEvaluation(trainer_cls):
        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            metrics = evaluate_fn(self.model, f"eval epoch {int(round(self.state.epoch or 0))}")
            self.log(dict(metrics))
            # Trainer looks metrics up as `eval_<name>` (metric_for_best_model): alias the job's other keys
            # (perplexity -> eval_perplexity) for its bookkeeping; only the job's own names are logged.
            metrics = {**{trainer_metric_name(k): v for k, v in metrics.items()}, **metrics}
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
            return metrics

    JobEvaluation.__name__ = JobEvaluation.__qualname__ = f"{trainer_cls.__name__}WithJobEvaluation"
    return JobEvaluation


def history_from_trainer(log_history: list[dict], metric_names: tuple[str, ...]) -> list[dict]:
    """Per-epoch rows from Trainer's log history (which survives resume inside trainer_state.json). Trainer logs
    the mean loss of the steps since its previous loss log, every `logging_steps` and at each epoch end (`fit_hf`
    forces that one), so no window spans two epochs: an epoch's `train_loss` is the step-weighted mean of its
    windows, the mean over its steps, as a once-per-epoch log would give."""
    rows: dict[int, dict] = {}
    loss: dict[int, list[float]] = {}  # epoch -> [sum of loss x steps, steps]
    last_step = 0
    for e in log_history:
        if "epoch" not in e:
            continue
        if "loss" in e and not any(k in e for k in metric_names):
            ep = max(1, math.ceil(float(e["epoch"]) - 1e-6))  # a window ends inside (or at the end of) its epoch
            step = int(e.get("step", last_step + 1))
            n = max(step - last_step, 1)
            acc = loss.setdefault(ep, [0.0, 0])
            acc[0], acc[1] = acc[0] + float(e["loss"]) * n, acc[1] + n
            last_step = step
            rows.setdefault(ep, {"epoch": ep})["train_loss"] = acc[0] / acc[1]
            continue
        ep = int(round(e["epoch"]))
        for k in metric_names:
            if k in e:
                rows.setdefault(ep, {"epoch": ep})[k] = float(e[k])
    return [rows[k] for k in sorted(rows) if k > 0]


def last_complete_trainer_checkpoint(output_dir: str) -> str | None:
    """Newest Trainer checkpoint whose state, weights (full or adapter) and optimizer all load; torn ones are
    skipped. Trainer checkpoints hold optimizer/RNG pickles: load only checkpoints this project wrote."""
    import re

    import torch
    from safetensors import safe_open

    root = Path(output_dir)
    if not root.exists():
        return None
    cands = sorted((p for p in root.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)),
                   key=lambda p: int(p.name.split("-")[1]), reverse=True)
    for c in cands:
        try:
            json.loads((c / "trainer_state.json").read_text())
            weights = c / "model.safetensors" if (c / "model.safetensors").exists() else c / "adapter_model.safetensors"
            with safe_open(str(weights), "pt") as f:
                for k in f.keys():
                    f.get_tensor(k)
            torch.load(c / "optimizer.pt", map_location="cpu", weights_only=True)
            return str(c)
        except Exception as e:
            log.warning("skipping incomplete Trainer checkpoint %s: %s", c, e)
    return None


COLLATOR_RNG = "collator_rng_{rank}.pt"


def collator_rng_callback(collator, rank: int):
    """A TrainerCallback that saves the masking collator's generator (`tasks.checkpoint.collator_rng_state`) into
    each Trainer checkpoint, one file per rank, beside Trainer's own RNG files: Trainer restores the global RNGs
    on resume, not a collator's seeded generator, so a resumed MLM run drew the masks of a fresh generator (tested:
    its losses left the uninterrupted run's). Nothing for a collator without one (classification)."""
    from transformers import TrainerCallback

    class _CollatorRNG(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            import torch

            st = collator_rng_state(collator)
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if st is not None and ckpt.is_dir():
                torch.save(st, ckpt / COLLATOR_RNG.format(rank=rank))

    return _CollatorRNG()


def load_collator_rng(collator, checkpoint: str, rank: int) -> None:
    """The masking collator's generator as the checkpoint's run left it (see `collator_rng_callback`); a checkpoint
    without it (written before it was saved, or with DataLoader workers) resumes with a fresh generator, and says
    so."""
    import torch

    f = Path(checkpoint) / COLLATOR_RNG.format(rank=rank)
    if f.exists():
        set_collator_rng_state(collator, torch.load(f, map_location="cpu", weights_only=True))
    elif _collator_rngs(collator):
        log.warning("checkpoint %s holds no masking-collator state: the resumed epochs draw other masks than an "
                    "uninterrupted run would", checkpoint)


def model_loss_per_batch(trainer) -> None:
    """Gradient accumulation with the model's own loss (Trainer's stock `compute_loss`): the loss is each batch's
    mean and Trainer divides it by the group's batch count, as the plain loop does. Trainer otherwise passes
    `num_items_in_batch` to any model whose forward takes **kwargs and then counts the loss as already divided by
    it, which a model that ignores it (BertForSequenceClassification and most heads but the LM ones) is not: the
    accumulated gradient came out k times too large (measured: 4 x 2 accumulated batches no longer matched batches
    of 8). A job class with its own `compute_loss` (the MLM SFTTrainer: masked tokens over the whole group) keeps
    Trainer's count."""
    from transformers import Trainer

    if type(trainer).compute_loss is Trainer.compute_loss and trainer.compute_loss_func is None:
        trainer.model_accepts_loss_kwargs = False


def quiet_trainer_output(trainer) -> None:
    """Trainer prints each log dict (PrinterCallback without bars, ProgressCallback's `write` with them): the
    epoch's line comes from `on_metrics` instead, and the training summary dict is not printed at all. Bars stay
    on a terminal."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class BarsOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    trainer.remove_callback(PrinterCallback)
    if any(type(c) is ProgressCallback for c in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(BarsOnly())


def fit_hf(spec: "JobSpec", model, tok, tokenized_path: str, run: Path, evaluate_fn, on_metrics, device, dtype,
           on_step: MetricsFn | None = None, on_evaluation: EvalHook | None = None) -> FitOutput:
    """The job's Trainer class (transformers.Trainer, TRL's SFTTrainer subclass, ...) on the same data, collator
    and evaluation as the plain loop; its per-epoch logs map onto the same metric names."""
    from datasets import load_from_disk
    from transformers import TrainerCallback

    recipe, t = spec.recipe, spec.train
    dd = load_from_disk(tokenized_path)

    # optimizer steps of the GLOBAL batch (batch_size x processes x gradient_accumulation_steps), counted as Trainer
    # counts them: warmup and the loss curve's x-axis are the plain loop's under torchrun and accumulation too
    world = distributed.world_size()
    steps_per_epoch = global_steps_per_epoch(len(dd["train"]), t, world)
    key, higher = spec.selection_metric
    # Trainer tracks the best epoch by the same metric (and keeps its checkpoint through save_total_limit);
    # with `select: best` it loads those weights at the end.
    kwargs = {**hf_training_kwargs(t, steps_per_epoch, device, dtype, world), "metric_for_best_model": trainer_metric_name(key),
              "greater_is_better": higher, "load_best_model_at_end": t.select == "best"}
    args = recipe.trainer_args(spec, str(run / "trainer"), kwargs)

    class ToMetrics(TrainerCallback):
        """After each evaluation, the epoch's row (train loss logged just before it, eval metrics) goes to
        `on_metrics`; rows come from Trainer's own log history, the same source as the final history."""

        def on_evaluate(self, args, state, control, **kw):
            rows = history_from_trainer(state.log_history, recipe.metrics)
            if on_metrics and rows:  # the callback shows the epoch (one line per epoch)
                on_metrics({k: v for k, v in rows[-1].items() if k != "epoch"}, rows[-1]["epoch"])
            elif rows:
                log.info("epoch %d: %s", rows[-1]["epoch"],
                         {k: round(v, 4) for k, v in rows[-1].items() if isinstance(v, float)})

    class StepLoss(TrainerCallback):
        """Trainer's loss logs (every `logging_steps`) become `train_loss_step` points at their global step; and a
        loss log at each epoch end, so that the per-epoch train_loss is exact (see history_from_trainer). A
        non-finite logged loss stops the run (`TrainingDiverged`)."""

        def on_epoch_end(self, args, state, control, **kw):
            control.should_log = True

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and not math.isfinite(float(logs["loss"])):
                raise diverged(state.global_step, t, dtype)  # as the plain loop: FAILED, one line, no retry
            if on_step and logs and "loss" in logs and state.is_world_process_zero:
                on_step({STEP_LOSS: float(logs["loss"])}, state.global_step)

    class StopEarly(TrainerCallback):
        """Early stopping by the rule the plain loop uses (`track_best`), computed from Trainer's log history: no
        state of its own, so a resumed run continues the count."""

        def on_evaluate(self, args, state, control, **kw):
            progress = track_best(history_from_trainer(state.log_history, recipe.metrics), key, higher)
            if progress.should_stop(t.early_stopping_patience):
                control.should_training_stop = True

    class OnEvaluation(TrainerCallback):
        """`on_evaluation` after each evaluation (after ToMetrics logged it); it may stop the run by raising."""

        def on_evaluate(self, args, state, control, **kw):
            rows = history_from_trainer(state.log_history, recipe.metrics)
            if rows:
                on_evaluation(rows[-1]["epoch"], {k: v for k, v in rows[-1].items() if k != "epoch"})

    resume = last_complete_trainer_checkpoint(args.output_dir) if t.resume else None
    if resume and t.early_stopping_patience:
        done = history_from_trainer(json.loads((Path(resume) / "trainer_state.json").read_text())["log_history"],
                                    recipe.metrics)
        if track_best(done, key, higher).should_stop(t.early_stopping_patience):
            args.num_train_epochs = done[-1]["epoch"]  # it had stopped early: train no further, only finish
    trainer_cls = with_job_evaluation(recipe.trainer_class(spec), evaluate_fn)
    if t.group_by_length:
        trainer_cls = with_seeded_length_groups(trainer_cls, t.seed)
    import torch

    # the plain loop's optimizer (same groups, same no-decay rule); Trainer builds the scheduler on it
    optimizer = build_optimizer(model, t, device)
    if resume and (Path(resume) / "optimizer.pt").exists():  # mmap: the group list only, no tensor is read
        saved = torch.load(Path(resume) / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True)
        check_optimizer_groups(resume, group_sizes(saved["param_groups"]), group_sizes(optimizer.param_groups))
    collator = recipe.collator(tok, spec_for_rank(spec, distributed.rank()))  # rank r > 0: its own masks
    if resume:
        load_collator_rng(collator, resume, distributed.rank())
    trainer = trainer_cls(
        model=model, args=args, train_dataset=dd["train"], eval_dataset=dd["eval"],
        data_collator=collator, processing_class=tok,
        optimizers=(optimizer, None),
        callbacks=[StepLoss(), ToMetrics(), collator_rng_callback(collator, distributed.rank()),
                   *([StopEarly()] if t.early_stopping_patience else []), *([OnEvaluation()] if on_evaluation else [])],
    )
    quiet_trainer_output(trainer)
    model_loss_per_batch(trainer)
    out = trainer.train(resume_from_checkpoint=resume)
    history = history_from_trainer(trainer.state.log_history, recipe.metrics)
    if resume and on_metrics:  # epochs logged before the interruption are skipped by the idempotent logger
        for row in history:
            on_metrics({k: v for k, v in row.items() if k != "epoch"}, row["epoch"])
    selected = history[-1]["epoch"] if history else None
    best_ckpt = trainer.state.best_model_checkpoint
    if t.select == "best" and best_ckpt:  # the weights Trainer loaded at the end: that checkpoint's epoch
        selected = int(round(json.loads((Path(best_ckpt) / "trainer_state.json").read_text())["epoch"]))
    return FitOutput(history=history, samples_per_second=float(out.metrics.get("train_samples_per_second", 0.0)),
                     resumed_from=resume, selected_epoch=selected, steps_per_epoch=steps_per_epoch)
