"""The plain training loop (engine `manual`)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tasks.training.config import STEP_LOSS, FitOutput, MetricsFn, loss_log_every
from tasks.training.optim import _optimizer_and_scheduler, check_optimizer_groups
from tasks.training.selection import _cpu_copy, track_best

if TYPE_CHECKING:
    from tasks.jobs import JobSpec


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
