"""Masked-LM training: setup -> fit -> evaluate, through TRL's SFTTrainer (`sft`) or a plain PyTorch loop
(`manual`). Both see the same blocks, the same masking collator and the same fixed-mask eval split, report the
same metric names per epoch through `on_metrics` (epoch 0 = before any training), and end with the model,
tokenizer, resolved config and metrics saved atomically in `run_dir/model`.

Metrics, all on the masked positions of the held-out split only:
  eval_loss             mean cross-entropy per masked token
  perplexity            exp(eval_loss)
  eval_masked_accuracy  share of masked tokens whose top-1 prediction is the original token
TRL's own `mean_token_accuracy`/`entropy` score each position against the *next* token: meaningless for a
masked LM, and not logged (the subclass below never feeds them)."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.config import MLMConfig
from tasks.train_classifier import (
    TrainResult,
    _write_run_files,
    fit_manual,
    hf_training_kwargs,
    last_complete_trainer_checkpoint,
    retry_unless_config_error,
    save_model_dir,
    setup_run,
)

log = logging.getLogger(__name__)
MetricsFn = Callable[[dict, int], None]

# Masked-LM classes whose prediction head is one module fed the backbone's hidden states (attribute name).
# For these the head runs only on the masked positions; any other model (or a DDP-wrapped one) runs its own
# full forward and the masked positions are picked from its logits: same numbers, more work.
SPARSE_HEADS = {
    "BertForMaskedLM": "cls",
    "RobertaForMaskedLM": "lm_head",
    "XLMRobertaForMaskedLM": "lm_head",
    "CamembertForMaskedLM": "lm_head",
}


def masked_lm_logits(model, inputs: dict):
    """Logits at the masked positions only, shape (M, vocab), in row-major order of `labels != -100`, and the
    M target ids. No shift: position i is scored against the original token at position i.

    The prediction head is a hidden x vocab matmul (30,522 columns for BERT): on MiniLM it costs about as much as
    the six encoder layers. Only ~15% of positions carry a label, so running the head there alone skips ~85% of
    that work without changing the loss or its gradients (unmasked positions contribute nothing to either)."""
    labels = inputs["labels"]
    mask = labels != -100
    features = {k: v for k, v in inputs.items() if k != "labels"}
    head = SPARSE_HEADS.get(type(model).__name__)
    if head is not None:
        hidden = getattr(model, model.base_model_prefix)(**features).last_hidden_state
        logits = getattr(model, head)(hidden[mask])
    else:
        logits = model(**features).logits[mask]
    return logits, labels[mask]


def _masked_counts(logits, targets) -> tuple[float, int, int]:
    """(sum of cross-entropy, top-1 hits, tokens) over masked positions."""
    import torch.nn.functional as F

    nll = F.cross_entropy(logits.float(), targets, reduction="sum")
    return float(nll), int((logits.argmax(-1) == targets).sum()), int(targets.numel())


def mlm_metrics(nll_sum: float, correct: int, n: int) -> dict[str, float]:
    loss = nll_sum / max(n, 1)
    return {
        "eval_loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "eval_masked_accuracy": correct / max(n, 1),
    }


def evaluate_mlm(model, loader, device, dtype=None, desc: str = "eval") -> dict[str, float]:
    """Token-weighted masked-LM loss, perplexity and masked-token accuracy over a loader of pre-masked rows."""
    import torch
    from tqdm.auto import tqdm

    from tasks.device import autocast

    was_training = model.training
    model.eval()
    nll, hits, n = 0.0, 0, 0
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, dtype):
                logits, targets = masked_lm_logits(model, batch)
            a, b, c = _masked_counts(logits, targets)
            nll, hits, n = nll + a, hits + b, n + c
    model.train(was_training)
    return mlm_metrics(nll, hits, n)


def _sft_trainer_class():
    """Defined on first use: importing TRL at module level would slow every CLI call and Prefect deploy."""
    import torch.nn.functional as F
    from transformers.modeling_outputs import MaskedLMOutput
    from trl import SFTTrainer

    class MaskedLMSFTTrainer(SFTTrainer):
        """TRL's SFTTrainer with the masked-LM objective. Everything else (SFTConfig, optimizer, scheduler,
        mixed precision, checkpoints, resume, evaluation loop, callbacks) is SFTTrainer's own.

        THE one place SFTTrainer's causal path is replaced is `compute_loss`. Stock SFTTrainer runs the model
        with `fused_lm_head=True`, which scores position i against the label at i+1 (and, for BERT, projects the
        raw hidden states without the MLM head's transform): with a masking collator that trains the wrong
        objective. Here the loss is the masked-LM cross-entropy at the masked positions themselves, through the
        model's own prediction head (see `masked_lm_logits`): the same value as the model's `outputs.loss`.
        The eval outputs carry logits for the masked positions only, which `compute_metrics` expects."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logits, targets = masked_lm_logits(model, inputs)
            nll = F.cross_entropy(logits.float(), targets, reduction="sum")
            # Trainer passes the masked-token count of the whole accumulated batch when it can; else a batch mean.
            denom = num_items_in_batch if num_items_in_batch is not None else targets.numel()
            loss = nll / (denom.clamp(min=1) if hasattr(denom, "clamp") else max(int(denom), 1))
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # the count spans all ranks; DDP averages gradients
            return (loss, MaskedLMOutput(loss=loss, logits=logits)) if return_outputs else loss

    return MaskedLMSFTTrainer


def build_sft_config(cfg: MLMConfig, output_dir: str, device, dtype, steps_per_epoch: int, **overrides):
    """The SFTConfig the flow's config maps onto. The data arrive tokenized, grouped and (for eval) masked, so
    TRL's own preparation (chat templates, EOS appending, causal labels) is skipped."""
    from trl import SFTConfig

    t = cfg.train
    kwargs = dict(
        output_dir=output_dir,
        **hf_training_kwargs(t, steps_per_epoch, device, dtype),  # bf16/fp16 follow our precision (TRL: bf16 on)
        max_length=cfg.data.max_length,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,  # the collator needs special_tokens_mask; it hands the model only inputs
        label_names=["labels"],
        activation_checkpointing=False,  # TRL turns it on by default: recompute costs ~30%, BERT-size models fit
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def fit_sft(cfg: MLMConfig, model, tok, tokenized_path: str, run: Path, on_metrics, device, dtype, epoch0_file: Path):
    """The job through TRL's SFTTrainer (subclassed for the masked-LM loss). Its logs map onto our metric names;
    epoch 0 is an evaluation before any training."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from datasets import load_from_disk
    from transformers import TrainerCallback

    from tasks.common import write_json_atomic
    from tasks.mlm_data import MLMBatchCollator

    t = cfg.train
    dd = load_from_disk(tokenized_path)
    steps_per_epoch = math.ceil(len(dd["train"]) / t.batch_size)
    args = build_sft_config(cfg, str(run / "trainer"), device, dtype, steps_per_epoch)
    history: list[dict] = []

    class ToMetrics(TrainerCallback):
        def __init__(self):
            self.pending: dict = {}

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and not any(k.startswith("eval_") for k in logs):
                self.pending["train_loss"] = float(logs["loss"])

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            m = metrics or {}
            nll, hits, n = m.get("eval_nll_sum"), m.get("eval_hits"), m.get("eval_masked_tokens")
            row = {"epoch": int(round(state.epoch or 0)), **self.pending, **mlm_metrics(nll, int(hits), int(n))}
            self.pending = {}
            history.append(row)
            if on_metrics:
                on_metrics({k: v for k, v in row.items() if k != "epoch"}, row["epoch"])

    def preprocess_logits_for_metrics(logits, labels):
        # `logits` hold the masked positions only (see compute_loss). Back onto the (batch, length) grid of the
        # labels, since the eval loop concatenates and truncates per row: top-1 ids and per-token cross-entropy.
        mask = labels != -100
        preds = torch.full_like(labels, -100)
        preds[mask] = logits.argmax(-1)
        nll = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        nll[mask] = F.cross_entropy(logits.float(), labels[mask], reduction="none")
        return preds, nll

    def compute_metrics(p):
        preds, nll = (np.asarray(x) for x in p.predictions)
        labels = np.asarray(p.label_ids)
        mask = labels != -100
        return {
            "nll_sum": float(nll[mask].sum()),
            "hits": int((preds[mask] == labels[mask]).sum()),
            "masked_tokens": int(mask.sum()),
        }

    trainer = _sft_trainer_class()(
        model=model,
        args=args,
        train_dataset=dd["train"],
        eval_dataset=dd["eval"],
        data_collator=MLMBatchCollator(tok, cfg.mlm_probability, t.seed),
        processing_class=tok,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        callbacks=[ToMetrics()],
    )
    resume = last_complete_trainer_checkpoint(args.output_dir) if t.resume else None
    if resume and epoch0_file.exists():
        import json

        history.append(json.loads(epoch0_file.read_text()))  # epoch 0 was logged by the interrupted run
    else:
        trainer.evaluate()  # epoch 0: the starting point, before any update
        write_json_atomic(epoch0_file, history[0])
    out = trainer.train(resume_from_checkpoint=resume)
    model.__dict__.pop("forward", None)  # drop TRL's fused-head forward patch; the class forward is untouched
    sps = float(out.metrics.get("train_samples_per_second", 0.0))
    return history, history[-1], sps, resume


def train_mlm(
    cfg: MLMConfig,
    tokenized_path: str,
    run_dir: str,
    loaders: dict | None = None,
    on_metrics: MetricsFn | None = None,
) -> TrainResult:
    """Plain function. Writes `run_dir/model` (save_pretrained + tokenizer + config.yaml + metrics.json)."""
    import json

    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tasks.common import resolve_model, run_logger, write_json_atomic
    from tasks.device import describe
    from tasks.loaders import build_dataloaders
    from tasks.mlm_data import MLMBatchCollator, mlm_stats

    log = run_logger(__name__)
    # --- setup
    cfg, run, device, dtype = setup_run(cfg, run_dir)
    t = cfg.train
    path = resolve_model(t.model)
    tok = AutoTokenizer.from_pretrained(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized" notice is reported once by the flow instead
    try:
        model = AutoModelForMaskedLM.from_pretrained(path)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.to(device)
    stats = mlm_stats(tokenized_path)
    log.info(
        "MLM %s: %d train blocks, %d eval blocks (%d masked eval tokens), max_length %d, %s, mlm_probability %.2f",
        cfg.engine, stats["train_blocks"], stats["eval_blocks"], stats["eval_masked_tokens"], cfg.data.max_length,
        "grouped" if cfg.group_texts else "truncated", cfg.mlm_probability,
    )
    epoch0_file = run / "epoch0_metrics.json"

    # --- fit
    if cfg.engine == "manual":
        if loaders is None:
            loaders = build_dataloaders(
                tokenized_path, t.model, t.batch_size, t.eval_batch_size, t.seed,
                collator=MLMBatchCollator(tok, cfg.mlm_probability, t.seed),
            )

        def evaluate_fn(m, desc):
            return evaluate_mlm(m, loaders["eval"], device, dtype, desc=desc)

        if t.resume and epoch0_file.exists() and (run / "checkpoints").exists():
            epoch0 = json.loads(epoch0_file.read_text())
        else:
            epoch0 = {"epoch": 0, **evaluate_fn(model, "eval epoch 0")}
            write_json_atomic(epoch0_file, epoch0)
            if on_metrics:
                on_metrics({k: v for k, v in epoch0.items() if k != "epoch"}, 0)
        history, final, sps, resumed = fit_manual(cfg, model, loaders, run, evaluate_fn, on_metrics, device, dtype)
        history = [epoch0, *history]
    else:
        history, final, sps, resumed = fit_sft(cfg, model, tok, tokenized_path, run, on_metrics, device, dtype, epoch0_file)
    log.info(
        "eval before -> after: loss %.4f -> %.4f, perplexity %.2f -> %.2f, masked accuracy %.4f -> %.4f",
        history[0]["eval_loss"], final["eval_loss"], history[0]["perplexity"], final["perplexity"],
        history[0]["eval_masked_accuracy"], final["eval_masked_accuracy"],
    )

    # --- save, atomically: a reader sees the previous complete model dir or the new one
    model_dir = save_model_dir(run, lambda d: (model.save_pretrained(d), tok.save_pretrained(d),
                                               _write_run_files(d, cfg, history, final)))
    return TrainResult(
        model_dir=str(model_dir), history=history, final=final, device=describe(device, dtype),
        train_samples_per_second=sps, resumed_from=resumed,
    )


# One retry, resuming from the last complete checkpoint (as for the classifier).
train_mlm_task = task(
    train_mlm, name="train-mlm", cache_policy=NO_CACHE, persist_result=False,
    retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_config_error,
)
