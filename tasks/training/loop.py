"""The plain training loop (engine `manual`) on `accelerate.Accelerator`, as transformers' `run_glue_no_trainer.py`
does it: `prepare` (device, DDP under torchrun: gloo on the CPU, nccl on GPUs), `autocast` and the loss scaler
(mixed precision), `accumulate` (gradient accumulation: no DDP all-reduce, clipping or optimizer step until a
group's last batch), `backward`, `clip_grad_norm_`, `skip_first_batches` for a resumed epoch, `save_state` /
`load_state` for checkpoints. One code path for 1 or N processes.

A checkpoint (tasks/checkpoint.py) is the folder `save_state` writes — the model (with LoRA the adapter and head
only, through save/load pre-hooks), the optimizer, the loss scaler, every process's RNG states, each written by its
own process — plus the project's own files for what accelerate does not hold: the position in the epoch, history,
best-epoch weights, the scheduler (stepped only when the optimizer stepped, so not `prepare`d) and each process's
masking-collator and loader generators. The project adds what makes it safe to resume from: every process writes
into one staging folder that rank 0 checksums and renames into place atomically, corrupt folders are skipped for
the previous one, and a process whose RNG file would not load says so instead of `load_state`'s silent fallback.
Checkpoints of the single-file format before it (`state.pt`, with one or every rank's RNG state) resume as before.
No stalls: the loss is summed on the device and read at logging steps, checkpoints and epoch ends only. A
non-finite loss stops the run (`TrainingDiverged`)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tasks import adapters, distributed
from tasks.checkpoint import (_collator_rngs, collator_rng_state, is_single_file, load_latest_checkpoint, rank_file,
                              read_checkpoint, read_rank_state, rng_file, rng_file_problem, save_checkpoint,
                              set_collator_rng_state, set_rng_state, write_state_file)
from tasks.common import ConfigError, run_logger
from tasks.device import mixed_precision_name
from tasks.output import progress_bars
from tasks.training.config import STEP_LOSS, EvalHook, FitOutput, MetricsFn, loss_log_every
from tasks.training.optim import _optimizer_and_scheduler, check_optimizer_groups, group_sizes, optimizer_steps
from tasks.training.selection import _cpu_copy, track_best

if TYPE_CHECKING:
    from tasks.jobs import JobSpec


class TrainingDiverged(ConfigError):
    """The loss became inf or NaN: the run stops as FAILED with one line (bad settings, not a transient fault:
    no retry, nothing registered)."""


def diverged(step: int, t, dtype) -> TrainingDiverged:
    tips = [f"a lower --learning-rate (this run: {t.learning_rate:g})"]
    if dtype is not None:
        tips.append("--precision fp32")
    return TrainingDiverged(f"training diverged: the loss is not finite at optimizer step {step}; try "
                            + " or ".join(tips))


def make_accelerator(device, dtype, gradient_accumulation_steps: int = 1):
    """An Accelerator for this run's device, precision and gradient accumulation. accelerate keeps its state per
    process: it is reset first (as transformers' TrainingArguments does), so runs with other precisions can follow
    in one process (tests, sweeps). fp16 on the CPU (a test of the GPU's fp16 path): accelerate 1.16 creates no loss
    scaler there and turns native AMP off, so its autocast, unscale-before-clipping and scaled steps would all be
    skipped (clipping would see scaled gradients); torch's CPU GradScaler is set in its place and native AMP on,
    which makes the CPU run the same calls as a GPU (autocast fp16, scaled backward, unscale, skipped steps on
    overflow). Not covered on the CPU: fp16 kernels' own overflow behaviour on a GPU."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    acc = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision_name(dtype),
                      gradient_accumulation_steps=gradient_accumulation_steps, step_scheduler_with_optimizer=False)
    if dtype == torch.float16 and acc.scaler is None:
        acc.scaler = torch.amp.GradScaler(device.type)
        acc.native_amp = True
    return acc


def step_loss(spec: "JobSpec"):
    """(model, batch) -> the training loss: the run's own (`Recipe.loss_for`: classify's class weights), the
    recipe's (MLM: the head on the masked positions only) or the model's."""
    run_loss = spec.recipe.loss_for(spec) if spec.recipe.loss_for else None
    return run_loss or spec.recipe.loss or (lambda m, batch: m(**batch).loss)


def train_step(acc, model, opt, sched, batch: dict, loss_fn, max_grad_norm: float, loss_scale: float = 1.0):
    """One batch as a run takes it (bench/bench_gpu.py times this same function), inside `acc.accumulate(model)`:
    the batch to the device (asynchronously from pinned memory on CUDA), forward under the run's autocast (also
    around a recipe's own loss, which may not call model.forward), scaled backward (accelerate divides the loss by
    gradient_accumulation_steps; `loss_scale` corrects that for a shorter last group of an epoch, see
    `accumulation_scale`). On a group's last batch (`acc.sync_gradients`; every batch without accumulation): DDP's
    all-reduce, unscale + clip, optimizer step, and the scheduler only when the optimizer stepped (fp16 skips a step
    whose gradients overflowed). Before it, gradients only add up (DDP's `no_sync`: no communication). Returns the
    loss as a device tensor (fp32, not read: no host sync) and the batch size."""
    batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
    with acc.accumulate(model):
        with acc.autocast():
            loss = loss_fn(model, batch)
        acc.backward(loss * loss_scale if loss_scale != 1.0 else loss)
        if acc.sync_gradients:
            acc.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            if not acc.optimizer_step_was_skipped:
                sched.step()
            opt.zero_grad(set_to_none=True)
    return loss.detach().float(), next(iter(batch.values())).shape[0]


def accumulation_scale(acc, i: int, batches: int) -> float:
    """Before batch `i` (0-based) of an epoch of `batches` batches: the loss factor for `train_step`, and the
    epoch's last batch made a sync step. accelerate counts batches in `acc.step` and syncs every
    gradient_accumulation_steps-th; its own end-of-epoch sync needs a loader it prepared, and this loop's loaders
    are its own (seeded samplers, DDP shards), so the epoch's last group, however short, is closed here. The loss
    of a short group is divided by its length, not by gradient_accumulation_steps: the step's gradient is then the
    mean over its batches, as transformers' Trainer takes it (`current_gradient_accumulation_steps`); equal to one
    batch of the group's size when the batches are of equal size (an MLM batch: per-batch masked-token means)."""
    k = acc.gradient_accumulation_steps
    if k == 1:
        return 1.0
    if i + 1 == batches:
        acc.step = k - 1  # the counter reaches k on this batch: sync, optimizer step
    return k / min(k, batches - (i // k) * k)


def adapter_only_checkpoints(acc, model) -> None:
    """LoRA: a checkpoint holds the adapter and the head (`adapters.model_state`), not the frozen base that every
    run loads from its own checkpoint. `save_state` writes them as its model file in place of the full state dict;
    `load_state` loads them into the model (peft's own loader, which refuses an adapter that does not fit) and leaves
    the base as it is. Other models: accelerate's own save and load (safetensors, shared weights handled)."""
    if not adapters.is_peft(model):
        return
    from collections import OrderedDict

    from accelerate.utils import SAFE_WEIGHTS_NAME
    from safetensors.torch import load_file

    def save_adapter(models, weights, output_dir) -> None:
        weights[0] = OrderedDict(adapters.model_state(model)["peft_adapter"])

    def load_adapter(models, input_dir) -> None:
        adapters.load_model_state(model, {"peft_adapter": load_file(Path(input_dir) / SAFE_WEIGHTS_NAME)})
        models.clear()  # loaded: accelerate loads no model

    acc.register_save_state_pre_hook(save_adapter)
    acc.register_load_state_pre_hook(load_adapter)


@contextmanager
def _accelerate_quiet():
    """accelerate logs every file it saves or loads at info level (six lines a checkpoint on rank 0's console, the
    staging folder's name among them); the loop logs what matters (resumed from, warnings)."""
    import logging

    loggers = [logging.getLogger(n) for n in ("accelerate.accelerator", "accelerate.checkpointing")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextmanager
def _scaler_aside(acc, aside: bool):
    """accelerate's save/load quiet, with the loss scaler set aside when `aside` (save_state and load_state write
    and read its file whenever the accelerator has one)."""
    scaler = acc.scaler
    if aside:
        acc.scaler = None
    try:
        with _accelerate_quiet():
            yield
    finally:
        acc.scaler = scaler


def save_state(acc, folder: Path, rank: int) -> None:
    """`acc.save_state(folder)` on every process. accelerate writes the loss scaler's state from every process into
    the same file; it is the same everywhere (gradients are all-reduced before unscaling), so rank 0 writes it
    alone."""
    with _scaler_aside(acc, rank != 0):
        acc.save_state(str(folder))


def load_state(acc, path: Path) -> None:
    """`acc.load_state(path)`. A checkpoint written without a loss scaler (another precision) leaves an fp16 run's
    scaler fresh, as the single-file format did, rather than failing on the missing file."""
    from accelerate.utils import SCALER_NAME

    with _scaler_aside(acc, acc.scaler is not None and not (path / SCALER_NAME).is_file()):
        acc.load_state(str(path))


def resume_single_file(path: Path, st: dict, acc, model, opt, rank: int) -> dict:
    """A checkpoint of the single-file format before save_state (`state.pt`): the model, optimizer, loss scaler and
    this rank's RNG states from it. Returns this rank's generator states (collator, loader), as far as it has them."""
    check_optimizer_groups(path, group_sizes(st["optimizer"]["param_groups"]), group_sizes(opt.param_groups))
    adapters.load_model_state(model, st["model"])
    opt.load_state_dict(st["optimizer"])
    if acc.scaler is not None and st.get("scaler"):
        acc.scaler.load_state_dict(st["scaler"])
    by_rank = st.get("rng_by_rank")
    mine = by_rank[rank] if by_rank else {"rng": st["rng"], "collator": None}
    if not by_rank and rank:  # a checkpoint of one RNG state (before per-rank states): keep this rank's own
        run_logger(__name__).warning("checkpoint %s holds rank 0's RNG state only: rank %d continues with its own",
                                     path, rank)
    else:
        set_rng_state(mine["rng"])
    return mine


def fit_manual(spec: "JobSpec", model, loaders: dict, run_dir: Path, evaluate_fn, on_metrics: MetricsFn | None,
               device, dtype, on_step: MetricsFn | None = None, on_evaluation: EvalHook | None = None) -> FitOutput:
    """The plain loop: AdamW, scheduler, clipping, mean train loss per epoch (and every `logging_steps` to
    `on_step`), the job's evaluation each epoch, and an atomic checkpoint each epoch (and every N steps) that a later
    run resumes from."""
    import time

    import torch
    from accelerate.utils import broadcast_object_list
    from tqdm.auto import tqdm

    log = run_logger(__name__)
    t = spec.train
    # --- setup: accelerator (device, precision, DDP), optimizer, schedule
    accumulation = t.gradient_accumulation_steps
    acc = make_accelerator(device, dtype, accumulation)
    train_loader = loaders["train"]
    # Single process: the loader's seeded generator orders each epoch. Data-parallel: a DistributedSampler does
    # (seed + epoch), each rank on its shard (tasks.distributed.shard_train_loader), and the loader's generator (one
    # per rank) only seeds its iterators; so steps_per_epoch counts global batches (batch_size x processes x
    # gradient_accumulation_steps) in both cases, and each rank checkpoints its generator's state at the epoch start.
    gen = train_loader.generator
    loss_fn = step_loss(spec)
    batches_per_epoch = len(train_loader)  # this process's batches; every `accumulation` of them make a step
    steps_per_epoch = optimizer_steps(batches_per_epoch, accumulation)
    opt, sched, total = _optimizer_and_scheduler(model, t, steps_per_epoch, device)
    ddp_model, opt = acc.prepare(model, opt)  # the scheduler steps only when the optimizer did (see below)
    adapter_only_checkpoints(acc, model)
    every = loss_log_every(t, total)
    history: list[dict] = []
    # Position in training: the epoch under way, batches of it already done, and its running loss.
    start_epoch, skip_batches, step, resumed_from = 1, 0, 0, None
    resumed_loss = (0.0, 0)
    ckpt_root = run_dir / "checkpoints"
    key, higher = spec.selection_metric
    keep_best = t.select == "best"
    world, rank = acc.num_processes, acc.process_index
    # The best epoch's weights (CPU copy; adapter + head only with LoRA) while later epochs train; None while the
    # model itself is the best (or nothing is best yet).
    best_state: dict | None = None

    if t.resume:
        # rank 0 verifies every file's checksum and chooses; every rank resumes from that folder
        found = load_latest_checkpoint(ckpt_root) if rank == 0 else None
        if world > 1:
            [chosen] = broadcast_object_list([str(found[0]) if found else None])
            if rank and chosen:
                found = Path(chosen), read_checkpoint(Path(chosen))
        if found:
            path, st = found
            saved_world = st.get("world_size", world)
            if saved_world != world:
                raise ConfigError(f"checkpoint {path} was written by {saved_world} process(es), this run has {world}: "
                                  f"resume with --nproc-per-node/--nnodes giving {saved_world} processes")
            saved_acc = (st.get("config") or {}).get("train", {}).get("gradient_accumulation_steps", 1)
            if saved_acc != accumulation:  # the schedule's length and the position in the epoch count its steps
                raise ConfigError(f"checkpoint {path} was written with gradient_accumulation_steps={saved_acc}, this "
                                  f"run has {accumulation}: resume with --gradient-accumulation-steps {saved_acc} "
                                  "(or start afresh without --resume)")
            if is_single_file(path):
                mine = resume_single_file(path, st, acc, model, opt, rank)
            else:
                check_optimizer_groups(path, st["optimizer_groups"], group_sizes(opt.param_groups))
                problem = rng_file_problem(path, rank)
                if problem:
                    log.warning("checkpoint %s: %s: process %d goes on with its current random state, so the resumed "
                                "run draws other random numbers (dropout, masks) than the interrupted one would have",
                                path, problem, rank)
                load_state(acc, path)
                mine = read_rank_state(path, rank) or {}
            sched.load_state_dict(st["scheduler"])
            if mine.get("collator"):
                set_collator_rng_state(train_loader.collate_fn, mine["collator"])
            elif _collator_rngs(train_loader.collate_fn):
                log.warning("checkpoint %s holds no masking-collator state (written before it was saved): the "
                            "resumed run draws other masks than the interrupted one would have", path)
            gen_state = mine.get("loader_gen", st.get("epoch_start_gen_state"))  # this rank's; before: rank 0's
            if gen is not None and gen_state is not None:
                gen.set_state(gen_state)  # replays the epoch's shuffle; done batches are skipped
            history, step = st["history"], st["step"]
            start_epoch, skip_batches, resumed_loss = st["epoch"], st["batches_done"], st["epoch_loss"]
            if rank:
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
        # Every process writes its part (save_state: rank 0 the model and optimizer, each its RNG file; here each
        # its generators), rank 0 the loop's state. The best epoch so far follows from the history; its weights
        # travel with the checkpoint unless they are the checkpoint's own model (the end of the best epoch), which
        # resume copies aside again.
        epoch_loss = distributed.sum_over_ranks(*epoch_loss)  # data-parallel: the partial epoch over all ranks
        own = None
        if rank == 0:
            at_best = (batches_done == 0 and history
                       and track_best(history, key, higher).best_epoch == history[-1]["epoch"])
            own = {"scheduler": sched.state_dict(), "optimizer_groups": group_sizes(opt.param_groups),
                   "world_size": world, "epoch": epoch,
                   "batches_done": batches_done, "epoch_loss": epoch_loss, "step": step, "history": history,
                   "best_state": None if at_best else best_state,
                   "config": spec.model_dump(mode="json")}  # plain values: it loads with weights_only=True

        def write(folder: Path) -> None:
            save_state(acc, folder, rank)
            write_state_file(folder / rank_file(rank), {"collator": collator_rng_state(train_loader.collate_fn),
                                                        "loader_gen": epoch_start_gen})

        save_checkpoint(ckpt_root, step, own, write=write, rank=rank,
                        expected=[f(r) for r in range(world) for f in (rng_file, rank_file)],
                        any_failed=lambda failed: distributed.sum_over_ranks(float(failed))[0] > 0)

    def read_losses(loss_sum, bad_step) -> float:
        """The one host sync of a logging step: the summed loss, and the first step whose loss was not finite."""
        s, bad = torch.stack([loss_sum.double(), bad_step.double()]).tolist()
        if bad >= 0:
            raise diverged(int(bad), t, dtype)
        return s

    parts = [f"{t.batch_size} per process x {world} processes"] if world > 1 else [f"{t.batch_size}"]
    if accumulation > 1:
        parts.append(f"{accumulation} accumulated batches")
    log.info("training: %d examples, %d epochs, batch %d%s, %d optimizer steps, device %s, precision %s",
             len(train_loader.dataset), t.epochs, t.batch_size * world * accumulation,
             f" (global: {' x '.join(parts)})" if len(parts) > 1 or world > 1 else "", total, acc.device,
             acc.mixed_precision + (" + loss scaling" if acc.scaler is not None else ""))
    model.train()
    seen, t0 = 0, time.perf_counter()
    dev = acc.device
    sum_dtype = torch.float32 if dev.type == "mps" else torch.float64  # MPS has no float64
    # on-device accumulators: the window since the last train_loss_step point, and the first non-finite step
    window_sum, window_n = torch.zeros((), device=dev), 0
    bad_step = torch.full((), -1, dtype=torch.long, device=dev)
    for epoch in range(start_epoch, t.epochs + 1):
        if track_best(history, key, higher).should_stop(t.early_stopping_patience):
            break  # a resumed run that had already stopped early
        distributed.set_epoch(train_loader, epoch)
        epoch_start_gen = gen.get_state() if gen is not None else None
        loss_sum, loss_n = torch.tensor(float(resumed_loss[0]), device=dev, dtype=sum_dtype), resumed_loss[1]
        resumed_loss = (0.0, 0)
        # a resumed epoch: the same permutation, its first batches skipped at the sampler (not collated); it starts
        # at a group's first batch (checkpoints are taken after optimizer steps), so accumulation counts from 0
        batches = acc.skip_first_batches(train_loader, skip_batches) if skip_batches else train_loader
        acc.step = 0
        bar = tqdm(batches, desc=f"epoch {epoch}/{t.epochs}", total=batches_per_epoch, initial=skip_batches,
                   disable=not progress_bars() or rank != 0)
        for i, batch in enumerate(bar, start=skip_batches):
            scale = accumulation_scale(acc, i, batches_per_epoch)
            l, bs = train_step(acc, ddp_model, opt, sched, batch, loss_fn, t.max_grad_norm, scale)
            seen += bs
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(l), step + 1, bad_step)
            loss_sum += l.to(sum_dtype) * bs
            loss_n += bs
            window_sum += l
            window_n += 1
            if not acc.sync_gradients:
                continue  # gradients accumulate: no optimizer step yet
            step += 1
            if step % every == 0:
                w = read_losses(window_sum, bad_step)
                if on_step:
                    on_step({STEP_LOSS: w / window_n}, step)
                bar.set_postfix(loss=f"{w / window_n:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}", refresh=False)
                window_sum.zero_()
                window_n = 0
            if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0 and i + 1 < batches_per_epoch:
                checkpoint(epoch, i + 1, epoch_start_gen, (read_losses(loss_sum, bad_step), loss_n))
        skip_batches = 0
        # a diverged rank stops every rank (each learns whether any diverged); then the epoch's mean over every
        # rank's shard
        first_bad = int(bad_step)
        if distributed.sum_over_ranks(float(first_bad >= 0))[0]:
            raise diverged(first_bad if first_bad >= 0 else step, t, dtype)
        loss_sum, loss_n = distributed.sum_over_ranks(read_losses(loss_sum, bad_step), loss_n)
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
        if on_evaluation:  # may stop the run by raising (a sweep's pruner)
            on_evaluation(epoch, {k: v for k, v in row.items() if k != "epoch"})
        if progress.should_stop(t.early_stopping_patience):
            log.info("early stopping after epoch %d: %s has not improved for %d epochs (best %s at epoch %s)",
                     epoch, key, progress.epochs_without_improvement, progress.best_value, progress.best_epoch)
            break
    elapsed = time.perf_counter() - t0
    (seen,) = distributed.sum_over_ranks(seen)  # samples/s of the whole run
    acc.unwrap_model(ddp_model, keep_fp32_wrapper=False)  # the model's own forward again (no autocast wrapper)
    selected = history[-1]["epoch"] if history else None
    best = track_best(history, key, higher).best_epoch
    if keep_best and best is not None and best != selected and best_state is not None:
        adapters.load_model_state(model, best_state)  # copied onto the model's device
        selected = best
        log.info("restored the weights of epoch %d, the best by %s", best, key)
    return FitOutput(history=history, samples_per_second=seen / elapsed if elapsed and seen else 0.0,
                     resumed_from=resumed_from, selected_epoch=selected, steps_per_epoch=steps_per_epoch)
