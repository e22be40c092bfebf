"""Sequence-classification training: setup -> fit -> evaluate, by a plain PyTorch loop (`manual`) or by the HF
Trainer (`trainer`). Both report the same metric names per epoch through `on_metrics`, so runs compare side by
side in MLflow, and both end with the model, tokenizer, resolved config and metrics saved in `run_dir/model`."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable

import yaml
from pydantic import BaseModel
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.config import ClassifyConfig
from tasks.data import PreparedData

log = logging.getLogger(__name__)
MetricsFn = Callable[[dict, int], None]


class TrainResult(BaseModel):
    model_dir: str
    history: list[dict]
    final: dict
    device: str
    train_samples_per_second: float | None = None
    resumed_from: str | None = None


def resume_on_retry(cfg):
    """A Prefect retry of the training task continues from the last complete checkpoint instead of restarting."""
    try:
        from prefect.runtime import task_run

        if (task_run.run_count or 1) > 1 and not cfg.train.resume:
            return cfg.model_copy(update={"train": cfg.train.model_copy(update={"resume": True})})
    except Exception:
        pass
    return cfg


def setup_run(cfg, run_dir: str):
    """Shared first phase of both jobs: resume on a Prefect retry, the run dir, device and precision, the seed."""
    from tasks.common import seed_everything
    from tasks.device import amp_dtype, select_device

    cfg = resume_on_retry(cfg)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    device = select_device(cfg.train.device)
    dtype = amp_dtype(device, cfg.train.precision)
    seed_everything(cfg.train.seed)
    return cfg, run, device, dtype


def save_model_dir(run: Path, write) -> Path:
    """`write(tmp_dir)` then rename to run/model; disk-full or permission errors become one clear error."""
    import errno
    import shutil

    final, tmp = run / "model", run / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        if final.exists():
            old = run / ".model.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM, errno.EFBIG):
            raise OSError(e.errno, f"could not save the model under {run}: {e.strerror}. Free disk space or point "
                          "--output-dir at a writable location; earlier checkpoints were left intact") from e
        raise
    return final


def _write_run_files(model_dir: Path, cfg, history, final) -> None:
    (model_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    (model_dir / "metrics.json").write_text(json.dumps({"history": history, "final": final}, indent=2))


def _load_model(cfg: ClassifyConfig, data: PreparedData):
    from transformers import AutoModelForSequenceClassification

    from tasks.common import resolve_model

    names = data.label_names
    return AutoModelForSequenceClassification.from_pretrained(
        resolve_model(cfg.train.model),
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )


def _optimizer_and_scheduler(model, t, steps_per_epoch: int):
    """AdamW without decay on biases and LayerNorm weights; warmup then the configured decay."""
    import torch
    from transformers import get_scheduler

    no_decay = ("bias", "LayerNorm.weight", "layernorm", "layer_norm")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)], "weight_decay": t.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=t.learning_rate)
    total = steps_per_epoch * t.epochs
    sched = get_scheduler(t.lr_scheduler, opt, num_warmup_steps=math.ceil(t.warmup_ratio * total), num_training_steps=total)
    return opt, sched, total


def fit_manual(
    cfg, model, loaders: dict, run_dir: Path, evaluate_fn, on_metrics: MetricsFn | None, device, dtype
) -> tuple[list[dict], dict, float, str | None]:
    """The plain loop shared by both jobs: AdamW, scheduler, clipping, mean train loss per epoch, an evaluation
    each epoch, and an atomic checkpoint each epoch (and every N steps) that a later run resumes from."""
    import time

    import torch
    from tqdm.auto import tqdm

    from tasks.checkpoint import load_latest_checkpoint, rng_state, save_checkpoint, set_rng_state
    from tasks.common import run_logger
    from tasks.device import autocast

    log = run_logger(__name__)
    t = cfg.train
    train_loader = loaders["train"]
    gen = train_loader.generator
    steps_per_epoch = len(train_loader)
    opt, sched, total = _optimizer_and_scheduler(model, t, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    history: list[dict] = []
    # Position in training: the epoch under way, batches of it already done, and its running loss.
    start_epoch, skip_batches, step, resumed_from = 1, 0, 0, None
    resumed_loss = (0.0, 0)
    ckpt_root = run_dir / "checkpoints"

    if t.resume:
        found = load_latest_checkpoint(ckpt_root)
        if found:
            path, st = found
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            set_rng_state(st["rng"])
            gen.set_state(st["epoch_start_gen_state"])  # replays the epoch's shuffle; done batches are skipped
            history, step = st["history"], st["step"]
            start_epoch, skip_batches, resumed_loss = st["epoch"], st["batches_done"], st["epoch_loss"]
            resumed_from = str(path)
            log.info("resumed from %s (epoch %d, step %d)", path, start_epoch, step)
            if on_metrics:  # idempotent: only epochs the interrupted run did not get to log are sent
                for row in history:
                    on_metrics({k: v for k, v in row.items() if k != "epoch"}, row["epoch"])

    def checkpoint(epoch: int, batches_done: int, epoch_start_gen, epoch_loss: tuple[float, int]) -> None:
        save_checkpoint(
            ckpt_root,
            step,
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": rng_state(),
                "epoch_start_gen_state": epoch_start_gen,
                "epoch": epoch,
                "batches_done": batches_done,
                "epoch_loss": epoch_loss,
                "step": step,
                "history": history,
                "config": cfg.model_dump(),
            },
        )

    log.info(
        "training: %d examples, %d epochs, batch %d, %d optimizer steps, device %s",
        len(train_loader.dataset), t.epochs, t.batch_size, total, device,
    )
    model.train()
    seen, t0 = 0, time.perf_counter()
    for epoch in range(start_epoch, t.epochs + 1):
        epoch_start_gen = gen.get_state()
        loss_sum, loss_n = resumed_loss
        resumed_loss = (0.0, 0)
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{t.epochs}", total=steps_per_epoch)
        for i, batch in enumerate(bar):
            if i < skip_batches:
                continue  # same permutation as the interrupted run: skip what it already trained on
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, dtype):
                loss = model(**batch).loss
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
            bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0 and i + 1 < steps_per_epoch:
                checkpoint(epoch, i + 1, epoch_start_gen, (loss_sum, loss_n))
        skip_batches = 0
        row = {"epoch": epoch, "train_loss": loss_sum / max(loss_n, 1), **evaluate_fn(model, f"eval epoch {epoch}")}
        history.append(row)
        # Checkpoint before logging: a crash in between re-logs nothing (the logger is idempotent per step).
        checkpoint(epoch + 1, 0, gen.get_state(), (0.0, 0))
        if on_metrics:
            on_metrics({k: v for k, v in row.items() if k != "epoch"}, epoch)
        log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
    elapsed = time.perf_counter() - t0
    return history, history[-1] if history else {}, seen / elapsed if elapsed and seen else 0.0, resumed_from


def train_classifier(
    cfg: ClassifyConfig,
    data: PreparedData,
    tokenized_path: str,
    run_dir: str,
    loaders: dict | None = None,
    on_metrics: MetricsFn | None = None,
) -> TrainResult:
    """Plain function. Writes `run_dir/model` (save_pretrained + tokenizer + config.yaml + metrics.json) and
    `run_dir/eval_predictions.json` for the confusion matrix."""
    from transformers import AutoTokenizer

    from tasks.common import resolve_model
    from tasks.device import describe
    from tasks.evaluate import evaluate_classifier
    from tasks.loaders import build_dataloaders

    # --- setup
    cfg, run, device, dtype = setup_run(cfg, run_dir)
    t = cfg.train
    model = _load_model(cfg, data).to(device)
    tok = AutoTokenizer.from_pretrained(resolve_model(t.model))
    if loaders is None:
        loaders = build_dataloaders(tokenized_path, t.model, t.batch_size, t.eval_batch_size, t.seed, cfg.data.pad_to_max_length)
    preds: dict = {}

    def evaluate_fn(m, desc):
        r = evaluate_classifier(m, loaders["eval"], device, dtype, desc=desc)
        preds.update(preds=r.pop("preds"), labels=r.pop("labels"))
        return {f"eval_{k}": v for k, v in r.items()}

    # --- fit
    if cfg.engine == "manual":
        history, final, sps, resumed = fit_manual(cfg, model, loaders, run, evaluate_fn, on_metrics, device, dtype)
    else:
        history, final, sps, resumed = fit_trainer(cfg, model, tok, tokenized_path, run, on_metrics, device, dtype, preds)

    # --- save (atomically: a full disk leaves the previous model dir and the checkpoints intact)
    model_dir = save_model_dir(run, lambda d: (model.save_pretrained(d), tok.save_pretrained(d),
                                               _write_run_files(d, cfg, history, final)))
    (run / "eval_predictions.json").write_text(json.dumps(preds))
    return TrainResult(
        model_dir=str(model_dir), history=history, final=final, device=describe(device, dtype),
        train_samples_per_second=sps, resumed_from=resumed,
    )


def hf_training_kwargs(t, steps_per_epoch: int, device, dtype) -> dict:
    """The TrainingArguments fields our TrainConfig maps onto, shared by the Trainer and SFTTrainer engines:
    evaluate, log and checkpoint once per epoch (checkpoints are what --resume continues from)."""
    import torch

    return dict(
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=math.ceil(t.warmup_ratio * steps_per_epoch * t.epochs),
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        eval_strategy="epoch",
        logging_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        report_to="none",
        use_cpu=device.type == "cpu",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        dataloader_num_workers=0,
    )


def fit_trainer(cfg, model, tok, tokenized_path, run: Path, on_metrics, device, dtype, preds: dict):
    """The same model and data through transformers.Trainer; its per-epoch logs are mapped onto our names."""
    import numpy as np
    from datasets import load_from_disk
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from tasks.evaluate import classification_metrics

    t = cfg.train
    dd = load_from_disk(tokenized_path)
    steps_per_epoch = math.ceil(len(dd["train"]) / t.batch_size)
    class ToMetrics(TrainerCallback):
        """After each evaluation, the epoch's row (train loss logged just before it, eval metrics) goes to
        `on_metrics`; rows come from Trainer's own log history, the same source as the final history."""

        def on_evaluate(self, args, state, control, **kw):
            rows = history_from_trainer(state.log_history)
            if on_metrics and rows:
                on_metrics({k: v for k, v in rows[-1].items() if k != "epoch"}, rows[-1]["epoch"])

    def compute_metrics(p):
        pred = np.argmax(p.predictions, axis=-1)
        preds.update(preds=pred.tolist(), labels=p.label_ids.tolist())
        return classification_metrics(pred, p.label_ids, model.config.num_labels)

    args = TrainingArguments(output_dir=str(run / "trainer"), **hf_training_kwargs(t, steps_per_epoch, device, dtype))
    collator = default_data_collator if cfg.data.pad_to_max_length else DataCollatorWithPadding(tok)
    trainer = Trainer(
        model=model, args=args, train_dataset=dd["train"], eval_dataset=dd["eval"], data_collator=collator,
        processing_class=tok, compute_metrics=compute_metrics, callbacks=[ToMetrics()],
    )
    resume = last_complete_trainer_checkpoint(args.output_dir) if t.resume else None
    out = trainer.train(resume_from_checkpoint=resume)
    sps = float(out.metrics.get("train_samples_per_second", 0.0))
    history = history_from_trainer(trainer.state.log_history)
    if resume and on_metrics:  # epochs logged before the interruption are skipped by the idempotent logger
        for row in history:
            on_metrics({k: v for k, v in row.items() if k != "epoch"}, row["epoch"])
    return history, history[-1] if history else {}, sps, resume


def history_from_trainer(log_history: list[dict]) -> list[dict]:
    """Per-epoch rows from Trainer's log history (which survives resume inside trainer_state.json)."""
    rows: dict[int, dict] = {}
    for e in log_history:
        if "epoch" not in e:
            continue
        ep = int(round(e["epoch"]))
        if "loss" in e and "eval_loss" not in e:
            rows.setdefault(ep, {"epoch": ep})["train_loss"] = float(e["loss"])
        for k in ("eval_loss", "eval_accuracy", "eval_f1"):
            if k in e:
                rows.setdefault(ep, {"epoch": ep})[k] = float(e[k])
    return [rows[k] for k in sorted(rows) if k > 0]


def last_complete_trainer_checkpoint(output_dir: str) -> str | None:
    """Newest Trainer checkpoint whose state, weights and optimizer all load; torn ones are skipped."""
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
            with safe_open(str(c / "model.safetensors"), "pt") as f:
                for k in f.keys():
                    f.get_tensor(k)
            torch.load(c / "optimizer.pt", map_location="cpu", weights_only=False)
            return str(c)
        except Exception as e:
            log.warning("skipping incomplete Trainer checkpoint %s: %s", c, e)
    return None


def retry_unless_config_error(task, task_run, state) -> bool:
    """Retry crashes and I/O trouble (the retry resumes from the last checkpoint), not bad input."""
    from flows.config import ConfigError

    return not isinstance(state.result(raise_on_failure=False), ConfigError)


# One retry: it resumes from the last complete checkpoint (see resume_on_retry), so a transient failure late in
# training costs one epoch at most.
train_classifier_task = task(
    train_classifier, name="train-classifier", cache_policy=NO_CACHE, persist_result=False,
    retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_config_error,
)
