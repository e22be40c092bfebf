"""The one training core for every job: setup -> fit (the plain PyTorch loop, or the job's HF Trainer class)
-> atomic save, returning a typed `TrainResult`. What differs between jobs comes from their recipe
(`tasks/jobs/`); nothing here switches on a job's name."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.common import EMBEDDED_MODEL, PROJECT_ROOT, ConfigError

if TYPE_CHECKING:
    from tasks.jobs import JobSpec

log = logging.getLogger(__name__)
MetricsFn = Callable[[dict, int], None]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        EMBEDDED_MODEL,
        description=f"Hub id or local path of a BERT-family checkpoint; '{EMBEDDED_MODEL}' is the offline MiniLM.",
    )
    epochs: int = Field(1, gt=0, description="Passes over the training data.")
    batch_size: int = Field(16, gt=0, description="Examples per optimizer step.")
    eval_batch_size: int = Field(64, gt=0, description="Examples per evaluation batch.")
    learning_rate: float = Field(
        5e-5, gt=0.0, description="Peak learning rate of AdamW (default per job, higher with --peft lora)."
    )
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay (not applied to biases/LayerNorm).")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of steps with linear warmup.")
    lr_scheduler: str = Field("linear", description="transformers scheduler name (linear, cosine, constant...).")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    seed: int = Field(42, description="Seeds data subsets, shuffling, initialisation and dropout.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 (or fp16) autocast on a GPU; on the CPU bf16 autocast where it is native "
        "(AMX or AVX512-BF16), else fp32."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto: a GPU when present.")
    dropout: float | None = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout of the model while fine-tuning (every dropout layer of the "
        "checkpoint; LoRA's own is `lora.dropout`); null keeps the checkpoint's (0.1 for BERT). 0 skips drawing the "
        "random masks, a fifth of a CPU step (see README: Speed).",
    )
    head_learning_rate_scale: float = Field(
        1.0, gt=0.0, description="Learning rate of the weights the checkpoint did not ship (a newly initialised "
        "head), as a multiple of learning_rate; the pretrained weights keep learning_rate. Full fine-tuning only: "
        "under LoRA every trainable weight takes lora's learning rate.",
    )
    freeze_embeddings: bool = Field(
        True, description="Keep the token-embedding matrix (half of MiniLM's weights) fixed: no gradient and no "
                          "optimizer state for it. With a tied MLM head its output weights stay fixed too.",
    )
    group_by_length: bool = Field(
        True, description="Batch training examples of similar length (seeded, resumable; transformers' "
                          "LengthGroupedSampler) so dynamic padding pads little: most on short or varied texts.",
    )
    attention: Literal["auto", "sdpa", "eager"] = Field(
        "auto", description="Attention kernels while training (evaluation keeps the model's own, sdpa): auto = "
                            "eager for bf16 on the CPU, where PyTorch's fused attention backward is slow, else sdpa.",
    )
    output_dir: str = Field(
        str(PROJECT_ROOT / "outputs"), description="Where checkpoints, resolved config and metrics are written."
    )
    logging_steps: int | None = Field(
        None, gt=0, description="Log the training loss every N optimizer steps, as the MLflow metric train_loss_step "
                                "(x axis: the step), beside the per-epoch train_loss (default: about 20 points per run).",
    )
    checkpoint_every_steps: int | None = Field(
        None, gt=0, description="Also checkpoint every N optimizer steps (always at each epoch end)."
    )
    resume: bool = Field(False, description="Resume from the last complete checkpoint in the run's output dir.")
    keep_checkpoints: bool = Field(
        False, description="Keep the run's checkpoints and local model copy after it finished and its model was "
                           "logged (default: removed then; a failed or killed run always keeps them for --resume).",
    )
    select: Literal["best", "last"] = Field(
        "best", description="Which epoch's weights the run saves and registers: best by the promotion metric, or "
                            "the last one trained.",
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after N epochs in a row without improvement of the promotion metric "
                                "(default: train every epoch).",
    )
    nproc_per_node: int = Field(
        1, ge=1, description="Data-parallel processes on this machine (one per GPU): the training step runs under "
                             "torchrun with DDP; batch_size is per process (global batch = batch_size x processes).",
    )
    nnodes: int = Field(1, ge=1, description="Machines in a data-parallel run (torchrun --nnodes); see README.")
    rdzv_endpoint: str | None = Field(
        None, description="host:port where the nodes of a multi-node run meet (torchrun --rdzv-endpoint).",
    )

    @model_validator(mode="after")
    def _multi_node_needs_endpoint(self) -> "TrainConfig":
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint: --rdzv-endpoint HOST:PORT, the rendezvous every node "
                             "reaches (node 0's address and a free port)")
        return self


class LoraConfig(BaseModel):
    """LoRA adapters through the `peft` library (used when `peft: lora`). Defaults suit BERT-family encoders."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, gt=0, description="Rank of the low-rank update matrices.")
    alpha: int = Field(16, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    target_modules: list[str] | None = Field(
        None, description="Names of the modules that get adapters; null = peft's default for the architecture "
        "(BERT/RoBERTa/ELECTRA: query, value; DeBERTa-v2: query_proj, value_proj). DistilBERT (q_lin, v_lin) and "
        "ModernBERT (Wqkv) have no peft default: name them."
    )


class TrainResult(BaseModel):
    """What training hands on: where the model is, the per-epoch history (epoch 0 = before training, for jobs that
    evaluate first; every epoch trained), the final row (the row of the epoch whose weights were saved: the
    selected epoch), the device, and the throughput. `best_epoch` is the best by the selection metric (None when no
    epoch scored a finite value); `stopped_early_at` the last epoch trained when early stopping ended the run."""

    model_dir: str
    history: list[dict]
    final: dict
    device: str
    selected_epoch: int | None = None
    best_epoch: int | None = None
    selection_metric: str | None = None
    stopped_early_at: int | None = None
    train_samples_per_second: float | None = None
    resumed_from: str | None = None
    trainable_parameters: int | None = None
    probe: dict[str, float] = {}  # the saved weights' scores on the first eval batch (see tasks.evaluate.probe_scores)
    total_parameters: int | None = None
    steps_per_epoch: int | None = None  # optimizer steps: places the train_loss_step points on the epoch axis


class FitOutput(BaseModel):
    history: list[dict]
    samples_per_second: float = 0.0
    resumed_from: str | None = None
    selected_epoch: int | None = None  # the epoch whose weights the model holds after fit (None: the last row)
    steps_per_epoch: int | None = None


# --- epoch selection and early stopping: one rule for both engines ----------------------------------------------


class Progress(BaseModel):
    """Where a run stands by its selection metric, computed from the per-epoch history alone (so it survives a
    resume with the history): the best epoch so far and how many epochs have passed without improving on it."""

    best_epoch: int | None = None
    best_value: float | None = None
    epochs_without_improvement: int = 0

    def should_stop(self, patience: int | None) -> bool:
        return bool(patience) and self.epochs_without_improvement >= patience


def track_best(history: list[dict], key: str, higher_is_better: bool) -> Progress:
    """The best epoch by `key`: a strict improvement over the best so far (a tie keeps the earlier epoch); a
    missing or non-finite value (a diverged run) never counts. Epoch 0 (the untrained model, for jobs that evaluate
    before training) is not a candidate: a run registers trained weights."""
    p = Progress()
    for row in history:
        if row.get("epoch", 0) < 1:
            continue
        v = row.get(key)
        ok = isinstance(v, (int, float)) and math.isfinite(v)
        if ok and (p.best_value is None or (v > p.best_value if higher_is_better else v < p.best_value)):
            p.best_epoch, p.best_value, p.epochs_without_improvement = row["epoch"], float(v), 0
        else:
            p.epochs_without_improvement += 1
    return p


def loss_log_every(t: TrainConfig, total_steps: int) -> int:
    """Steps between two `train_loss_step` points: `logging_steps`, else 20 to 40 points per run (every step of a
    run shorter than 20 steps)."""
    return t.logging_steps or max(1, total_steps // 20)


STEP_LOSS = "train_loss_step"  # the step-level series; `train_loss` stays the per-epoch mean (step = epoch)


def _cpu_copy(state: dict) -> dict:
    """A detached CPU copy of a (possibly nested, for LoRA) state dict: the best epoch's weights, kept aside."""
    import torch

    return {k: _cpu_copy(v) if isinstance(v, dict) else v.detach().to("cpu", copy=True)
            if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def prepare_for_training(model, t: TrainConfig) -> None:
    """The step-cost choices of TrainConfig, applied to a freshly loaded model before any adapters (so LoRA's own
    dropout keeps `lora.dropout`): dropout probability on every dropout layer (the eager and sdpa attention read
    it from the attention's dropout layer), and the token-embedding matrix frozen."""
    import torch

    if t.dropout is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = t.dropout
    if t.freeze_embeddings and model.get_input_embeddings() is not None:
        model.get_input_embeddings().weight.requires_grad_(False)


def training_attention(t: TrainConfig, device, dtype) -> str | None:
    """The attention implementation to train with, None for the model's own. Measured on a CPU with AVX512-BF16
    (MiniLM, batch 16, length 128, bench/bench_step.py): in bf16, eager attention makes a step 1.35x faster than
    sdpa (the fused CPU attention's backward is slow in bf16); in fp32 and for inference, sdpa is faster."""
    import torch

    if t.attention != "auto":
        return t.attention
    return "eager" if device.type == "cpu" and dtype == torch.bfloat16 else None


class attention_implementation:
    """`with attention_implementation(model, impl):` runs the block with that attention implementation and puts
    the model's back after (None: no change). transformers switches it on a loaded model (set_attn_implementation)."""

    def __init__(self, model, impl: str | None):
        self.model, self.impl, self.prev = model, impl, None

    def __enter__(self):
        current = getattr(self.model.config, "_attn_implementation", None)
        if self.impl and current and self.impl != current:
            self.prev = current
            self.model.set_attn_implementation(self.impl)
        return self.model

    def __exit__(self, *exc) -> None:
        if self.prev:
            self.model.set_attn_implementation(self.prev)


def fused_adamw_supported(device) -> bool:
    """torch's fused AdamW (one kernel over all parameters) runs on CPU and CUDA tensors: 1.09x a bf16 CPU step on
    MiniLM against the for-each implementation (bench/bench_step.py)."""
    return device.type in ("cpu", "cuda")


# --- setup ---------------------------------------------------------------------------------------------------


def resume_on_retry(spec: "JobSpec") -> "JobSpec":
    """A Prefect retry of the training task continues from the last complete checkpoint instead of restarting."""
    try:
        from prefect.runtime import task_run

        if (task_run.run_count or 1) > 1 and not spec.train.resume:
            return spec.model_copy(update={"train": spec.train.model_copy(update={"resume": True})})
    except Exception:
        pass
    return spec


def build_loaders(tokenized_path: str, spec: "JobSpec", tokenizer=None) -> dict:
    """Train (seeded shuffle) and eval loaders with the job's collator: the eval loader is the one every
    evaluation of the job uses (each epoch, both engines, promotion)."""
    from transformers import AutoTokenizer

    from tasks.common import resolve_model
    from tasks.loaders import build_dataloaders

    t = spec.train
    tok = tokenizer or AutoTokenizer.from_pretrained(resolve_model(t.model))
    return build_dataloaders(tokenized_path, t.model, t.batch_size, t.eval_batch_size, t.seed,
                             collator=spec.recipe.collator(tok, spec), group_by_length=t.group_by_length)


NEW_WEIGHTS = "_finetune_new_weights"


def mark_new_weights(model, loading_info: dict):
    """Records on the model which of its parameters the checkpoint did not ship (transformers' loading info
    `missing_keys`: a new head), so that `head_learning_rate_scale` can find them; returns the model."""
    missing = set(loading_info.get("missing_keys", ()))
    setattr(model, NEW_WEIGHTS, {id(p) for n, p in model.named_parameters() if n in missing})
    return model


def param_groups(model, t: TrainConfig) -> list[dict]:
    """AdamW groups: no decay on biases and LayerNorm weights; the new weights (see `mark_new_weights`) at
    `head_learning_rate_scale` x learning_rate when that is not 1. A new head has everything to learn, the
    pretrained body little: measured on the mlm default, a 10x head rate took perplexity from 85.1 to 73.7."""
    no_decay = ("bias", "LayerNorm.weight", "layernorm", "layer_norm")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # LoRA: adapters (+ head) only
    new = getattr(model, NEW_WEIGHTS, set()) if t.head_learning_rate_scale != 1 else set()
    groups = []
    for is_new in (False, True):
        for decay in (True, False):
            ps = [p for n, p in params if (id(p) in new) == is_new and (not any(k in n for k in no_decay)) == decay]
            if ps or (not is_new):  # the two pretrained groups always exist (checkpointed optimizer layouts)
                groups.append({"params": ps, "weight_decay": t.weight_decay if decay else 0.0,
                               "lr": t.learning_rate * (t.head_learning_rate_scale if is_new else 1.0)})
    return groups


def check_optimizer_groups(checkpoint, saved: int, built: int) -> None:
    """A checkpoint's optimizer state loads only into as many parameter groups as it was saved with: say so in one
    line before anything loads (e.g. a checkpoint written before head_learning_rate_scale split the groups)."""
    if saved != built:
        raise ConfigError(
            f"checkpoint {checkpoint} holds an optimizer with {saved} parameter groups, this run builds {built}: "
            "resume with the settings it was written with (a checkpoint from before --head-learning-rate-scale: "
            "--head-learning-rate-scale 1)")


def _optimizer_and_scheduler(model, t: TrainConfig, steps_per_epoch: int, device=None):
    """AdamW (see `param_groups`); warmup then the configured decay."""
    import torch
    from transformers import get_scheduler

    opt = torch.optim.AdamW(param_groups(model, t), lr=t.learning_rate,
                            fused=device is not None and fused_adamw_supported(device))
    total = steps_per_epoch * t.epochs
    sched = get_scheduler(t.lr_scheduler, opt, num_warmup_steps=math.ceil(t.warmup_ratio * total), num_training_steps=total)
    return opt, sched, total


# --- fit: the plain loop ---------------------------------------------------------------------------------------


def fit_manual(spec: "JobSpec", model, loaders: dict, run_dir: Path, evaluate_fn, on_metrics: MetricsFn | None,
               device, dtype, on_step: MetricsFn | None = None) -> FitOutput:
    """The plain loop: AdamW, scheduler, clipping, mean train loss per epoch (and every `logging_steps` to
    `on_step`), the job's evaluation each epoch, and an atomic checkpoint each epoch (and every N steps) that a later
    run resumes from."""
    import time

    import torch
    from tqdm.auto import tqdm

    from tasks import adapters, distributed
    from tasks.checkpoint import load_latest_checkpoint, rng_state, save_checkpoint, set_rng_state
    from tasks.common import run_logger
    from tasks.device import autocast
    from tasks.output import progress_bars

    log = run_logger(__name__)
    t = spec.train
    train_loader = loaders["train"]
    # Single process: the loader's seeded generator orders each epoch. Data-parallel: a DistributedSampler does
    # (seed + epoch), each rank on its shard, and DDP all-reduces the gradients in backward().
    gen = train_loader.generator
    ddp_model = distributed.wrap(model, device)
    recipe_loss = spec.recipe.loss
    steps_per_epoch = len(train_loader)
    opt, sched, total = _optimizer_and_scheduler(model, t, steps_per_epoch, device)
    every = loss_log_every(t, total)
    window = [0.0, 0]  # batch losses since the last train_loss_step point
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    history: list[dict] = []
    # Position in training: the epoch under way, batches of it already done, and its running loss.
    start_epoch, skip_batches, step, resumed_from = 1, 0, 0, None
    resumed_loss = (0.0, 0)
    ckpt_root = run_dir / "checkpoints"
    key, higher = spec.selection_metric
    keep_best = t.select == "best"
    # The best epoch's weights (CPU copy; adapter + head only with LoRA) while later epochs train; None while the
    # model itself is the best (or nothing is best yet).
    best_state: dict | None = None

    if t.resume:
        found = load_latest_checkpoint(ckpt_root)
        if found:
            path, st = found
            check_optimizer_groups(path, len(st["optimizer"]["param_groups"]), len(opt.param_groups))
            adapters.load_model_state(model, st["model"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            set_rng_state(st["rng"])
            if gen is not None and st["epoch_start_gen_state"] is not None:
                gen.set_state(st["epoch_start_gen_state"])  # replays the epoch's shuffle; done batches are skipped
            history, step = st["history"], st["step"]
            start_epoch, skip_batches, resumed_loss = st["epoch"], st["batches_done"], st["epoch_loss"]
            if not distributed.is_main():
                resumed_loss = (0.0, 0)  # the checkpoint holds the sum over all ranks: counted once, on rank 0
            resumed_from = str(path)
            best_state = st.get("best_state")
            best = track_best(history, key, higher)
            if keep_best and best_state is None and best.best_epoch is not None:
                if best.best_epoch == history[-1]["epoch"] and not skip_batches:
                    best_state = _cpu_copy(adapters.model_state(model))  # saved at the end of the best epoch
                else:  # a checkpoint written before epoch selection existed
                    log.warning("checkpoint %s does not hold the weights of the best epoch %d: the run will save "
                                "its last epoch", path, best.best_epoch)
            log.info("resumed from %s (epoch %d, step %d)", path, start_epoch, step)
            if on_metrics:  # idempotent: only epochs the interrupted run did not get to log are sent
                for row in history:
                    on_metrics({k: v for k, v in row.items() if k != "epoch"}, row["epoch"])

    def checkpoint(epoch: int, batches_done: int, epoch_start_gen, epoch_loss: tuple[float, int]) -> None:
        # The best epoch so far follows from the history; its weights travel with the checkpoint unless they are
        # the checkpoint's own model (the end of the best epoch), which resume copies aside again.
        epoch_loss = distributed.sum_over_ranks(*epoch_loss)  # data-parallel: the partial epoch over all ranks
        if not distributed.is_main():
            return  # rank 0 writes the checkpoint (every rank holds the same weights and optimizer state)
        at_best = batches_done == 0 and history and track_best(history, key, higher).best_epoch == history[-1]["epoch"]
        save_checkpoint(ckpt_root, step, {
            "model": adapters.model_state(model), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": rng_state(), "epoch_start_gen_state": epoch_start_gen, "epoch": epoch,
            "batches_done": batches_done, "epoch_loss": epoch_loss, "step": step, "history": history,
            "best_state": None if at_best else best_state,
            "config": spec.model_dump(mode="json"),  # plain values: the checkpoint loads with weights_only=True
        })

    world = distributed.world_size()
    log.info("training: %d examples, %d epochs, batch %d%s, %d optimizer steps, device %s",
             len(train_loader.dataset), t.epochs, t.batch_size * world,
             f" (global: {t.batch_size} per process x {world} processes)" if world > 1 else "", total, device)
    model.train()
    seen, t0 = 0, time.perf_counter()
    for epoch in range(start_epoch, t.epochs + 1):
        if track_best(history, key, higher).should_stop(t.early_stopping_patience):
            break  # a resumed run that had already stopped early
        distributed.set_epoch(train_loader, epoch)
        epoch_start_gen = gen.get_state() if gen is not None else None
        loss_sum, loss_n = resumed_loss
        resumed_loss = (0.0, 0)
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{t.epochs}", total=steps_per_epoch,
                   disable=not progress_bars() or not distributed.is_main())
        for i, batch in enumerate(bar):
            if i < skip_batches:
                continue  # same permutation as the interrupted run: skip what it already trained on
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, dtype):
                loss = recipe_loss(ddp_model, batch) if recipe_loss else ddp_model(**batch).loss
            if scaler:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bs = next(iter(batch.values())).shape[0]
            seen += bs
            loss_sum += loss.item() * bs
            loss_n += bs
            window[0], window[1] = window[0] + loss.item(), window[1] + 1
            if on_step and step % every == 0:
                on_step({STEP_LOSS: window[0] / window[1]}, step)
                window[0], window[1] = 0.0, 0
            bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0 and i + 1 < steps_per_epoch:
                checkpoint(epoch, i + 1, epoch_start_gen, (loss_sum, loss_n))
        skip_batches = 0
        loss_sum, loss_n = distributed.sum_over_ranks(loss_sum, loss_n)  # the epoch's mean over every rank's shard
        row = {"epoch": epoch, "train_loss": loss_sum / max(loss_n, 1), **evaluate_fn(model, f"eval epoch {epoch}")}
        history.append(row)
        progress = track_best(history, key, higher)
        if keep_best and progress.best_epoch == epoch:
            best_state = _cpu_copy(adapters.model_state(model))  # later epochs train on: keep these weights aside
        # Checkpoint before logging: a crash in between re-logs nothing (the logger is idempotent per step).
        checkpoint(epoch + 1, 0, gen.get_state() if gen is not None else None, (0.0, 0))
        if on_metrics:  # the callback shows the epoch (one line per epoch)
            on_metrics({k: v for k, v in row.items() if k != "epoch"}, epoch)
        else:
            log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
        if progress.should_stop(t.early_stopping_patience):
            log.info("early stopping after epoch %d: %s has not improved for %d epochs (best %s at epoch %s)",
                     epoch, key, progress.epochs_without_improvement, progress.best_value, progress.best_epoch)
            break
    elapsed = time.perf_counter() - t0
    (seen,) = distributed.sum_over_ranks(seen)  # samples/s of the whole run
    selected = history[-1]["epoch"] if history else None
    best = track_best(history, key, higher).best_epoch
    if keep_best and best is not None and best != selected and best_state is not None:
        adapters.load_model_state(model, best_state)  # copied onto the model's device
        selected = best
        log.info("restored the weights of epoch %d, the best by %s", best, key)
    return FitOutput(history=history, samples_per_second=seen / elapsed if elapsed and seen else 0.0,
                     resumed_from=resumed_from, selected_epoch=selected, steps_per_epoch=steps_per_epoch)


# --- fit: the job's HF Trainer class -------------------------------------------------------------------------


def hf_training_kwargs(t: TrainConfig, steps_per_epoch: int, device, dtype) -> dict:
    """The TrainingArguments fields TrainConfig maps onto, for every job's Trainer class: evaluate and checkpoint
    once per epoch (checkpoints are what --resume continues from), log the loss every `loss_log_every` steps (and at
    each epoch end, see `fit_hf`); Trainer's bars only on a terminal."""
    import torch

    from tasks.output import progress_bars

    return dict(
        num_train_epochs=t.epochs, per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.eval_batch_size,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay,
        warmup_steps=math.ceil(t.warmup_ratio * steps_per_epoch * t.epochs), lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm, seed=t.seed, data_seed=t.seed, eval_strategy="epoch",
        logging_strategy="steps", logging_steps=loss_log_every(t, steps_per_epoch * t.epochs),
        save_strategy="epoch", save_total_limit=2, report_to="none", disable_tqdm=not progress_bars(),
        use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        dataloader_num_workers=0, train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        optim="adamw_torch_fused" if fused_adamw_supported(device) else "adamw_torch",
    )


def with_seeded_length_groups(trainer_cls: type, seed: int) -> type:
    """The Trainer class with length-grouped batches in an order fixed by (seed, epoch): resumable (see
    `tasks.loaders.epoch_seeded_length_sampler`)."""
    from tasks.loaders import epoch_seeded_length_sampler, example_lengths

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
           on_step: MetricsFn | None = None) -> FitOutput:
    """The job's Trainer class (transformers.Trainer, TRL's SFTTrainer subclass, ...) on the same data, collator
    and evaluation as the plain loop; its per-epoch logs map onto the same metric names."""
    from datasets import load_from_disk
    from transformers import TrainerCallback

    recipe, t = spec.recipe, spec.train
    dd = load_from_disk(tokenized_path)
    steps_per_epoch = math.ceil(len(dd["train"]) / t.batch_size)
    key, higher = spec.selection_metric
    # Trainer tracks the best epoch by the same metric (and keeps its checkpoint through save_total_limit);
    # with `select: best` it loads those weights at the end.
    kwargs = {**hf_training_kwargs(t, steps_per_epoch, device, dtype), "metric_for_best_model": trainer_metric_name(key),
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
        loss log at each epoch end, so that the per-epoch train_loss is exact (see history_from_trainer)."""

        def on_epoch_end(self, args, state, control, **kw):
            control.should_log = True

        def on_log(self, args, state, control, logs=None, **kw):
            if on_step and logs and "loss" in logs and state.is_world_process_zero:
                on_step({STEP_LOSS: float(logs["loss"])}, state.global_step)

    class StopEarly(TrainerCallback):
        """Early stopping by the rule the plain loop uses (`track_best`), computed from Trainer's log history: no
        state of its own, so a resumed run continues the count."""

        def on_evaluate(self, args, state, control, **kw):
            progress = track_best(history_from_trainer(state.log_history, recipe.metrics), key, higher)
            if progress.should_stop(t.early_stopping_patience):
                control.should_training_stop = True

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

    groups = param_groups(model, t)
    optimizers = (None, None)
    if len(groups) > 2:  # new weights at their own rate: our groups; Trainer still builds the scheduler
        optimizers = (torch.optim.AdamW(groups, lr=t.learning_rate, fused=fused_adamw_supported(device)), None)
    if resume and (Path(resume) / "optimizer.pt").exists():  # mmap: the group list only, no tensor is read
        saved = torch.load(Path(resume) / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True)
        check_optimizer_groups(resume, len(saved["param_groups"]), len(groups) if optimizers[0] is not None else 2)
    trainer = trainer_cls(
        model=model, args=args, train_dataset=dd["train"], eval_dataset=dd["eval"],
        data_collator=recipe.collator(tok, spec), processing_class=tok, optimizers=optimizers,
        callbacks=[StepLoss(), ToMetrics(), *([StopEarly()] if t.early_stopping_patience else [])],
    )
    quiet_trainer_output(trainer)
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


# --- save ----------------------------------------------------------------------------------------------------


def save_model_dir(run: Path, write: Callable[[Path], Any]) -> Path:
    """`write(tmp_dir)`, then renamed to run/model in one step: a full disk leaves the previous model dir and the
    checkpoints intact, with one clear error."""
    from tasks.common import atomic_dir

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


def model_for_training(spec: "JobSpec", tokenized_path: str, device):
    """The model as training starts from it, and its tokenizer: the job's model (its head), the recipe's
    initialisation of new weights, the step-cost choices, LoRA adapters when asked, on the device. Shared by
    `train` and bench/bench_gpu.py, so that the bench measures the step a run takes."""
    from transformers import AutoTokenizer

    from tasks import adapters
    from tasks.common import resolve_model, run_logger

    recipe = spec.recipe
    path = resolve_model(spec.train.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = recipe.load_model(path, spec)
    # Full fine-tuning only: a LoRA model is rebuilt at load time from the base checkpoint plus what the adapter
    # saved, so values set here on weights it does not train (the MLM head's bias) would be lost on the way.
    if recipe.init_model and spec.peft != "lora":
        recipe.init_model(model, tokenized_path, spec)
    prepare_for_training(model, spec.train)
    if spec.peft == "lora":
        model = adapters.apply_lora(model, spec.lora.r, spec.lora.alpha, spec.lora.dropout,
                                    spec.lora.target_modules, recipe.hf_task)
    trainable, total = adapters.trainable_parameters(model)
    run_logger(__name__).info("%s: %d of %d parameters trainable (%.2f%%)",
                              spec.peft if spec.peft != "none" else "full fine-tuning", trainable, total,
                              100.0 * trainable / max(total, 1))
    return model.to(device), tok


def train(spec: "JobSpec", tokenized_path: str, run_dir: str, loaders: dict | None = None,
          on_metrics: MetricsFn | None = None, on_step: MetricsFn | None = None) -> TrainResult:
    """setup -> fit (the plain loop for engine `manual`, else the job's Trainer class) -> atomic save, for any job.
    Writes `run_dir/model` (weights or adapter, tokenizer, config.yaml, metrics.json) and `run_dir/eval_extras.json`
    (what the last evaluation returned besides metrics, e.g. predictions for a confusion matrix). `on_metrics` gets
    each epoch's row (step = epoch), `on_step` the `train_loss_step` points (step = optimizer step)."""
    from tasks.common import run_logger, seed_everything, write_json_atomic
    from tasks.device import amp_dtype, describe, select_device

    from tasks import adapters, distributed

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
    seed_everything(spec.train.seed)
    model, tok = model_for_training(spec, tokenized_path, device)
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
            out = fit_manual(spec, model, loaders, run, evaluate_fn, on_metrics, device, dtype, on_step)
        else:
            out = fit_hf(spec, model, tok, tokenized_path, run, evaluate_fn, on_metrics, device, dtype, on_step)
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
    from tasks.evaluate import probe_scores

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
        steps_per_epoch=out.steps_per_epoch,
    )


build_loaders_task = task(build_loaders, name="build-dataloaders", cache_policy=NO_CACHE, persist_result=False)


def retry_unless_config_error(task, task_run, state) -> bool:
    """Retry crashes and I/O trouble (the retry resumes from the last checkpoint), not bad input."""
    return not isinstance(state.result(raise_on_failure=False), ConfigError)


# One retry: it resumes from the last complete checkpoint (see resume_on_retry), so a transient failure late in
# training costs one epoch at most.
train_task = task(
    train, name="train", cache_policy=NO_CACHE, persist_result=False,
    retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_config_error,
)
