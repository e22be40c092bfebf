"""Masked-language-model fine-tuning: the recipe. Engines: `sft` (TRL's SFTTrainer with the masked-LM loss) and
`manual` (the core's plain loop). Both see the same blocks, the same masking collator and the same fixed-mask eval
split (`tasks/mlm_data.py`), and report the same metric names per epoch (epoch 0 = before any training).

Metrics, all on the masked positions of the held-out split only:
  eval_loss             mean cross-entropy per masked token
  perplexity            exp(eval_loss)
  eval_masked_accuracy  share of masked tokens whose top-1 prediction is the original token
TRL's own `mean_token_accuracy`/`entropy` score each position against the *next* token: meaningless for a
masked LM, and not logged (the subclass below never feeds them)."""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.adapters import load_pipeline
from tasks.common import run_logger
from tasks.device import autocast
from tasks.jobs import JobSpec, Promotion, Recipe, epoch0_baseline, register
from tasks.mlm_data import MLMBatchCollator, mlm_stats, tokenize_for_mlm
from tasks.output import progress_bars
from tasks.predict import fill_mask, format_predictions, predict_fill_mask
from tasks.tokenize import check_model as check
from tasks.training import mark_new_weights

EXAMPLE = "This is a [MASK] movie!"


class MLMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: Literal["sft", "manual"] = Field("sft", description="sft: TRL SFTTrainer; manual: plain PyTorch loop.")
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0, description="Share of tokens masked (80/10/10 rule).")
    train_mlm_probability: float | None = Field(
        0.3, gt=0.0, lt=1.0, description="Share masked in training batches (null = mlm_probability). The held-out "
        "masks always use mlm_probability, so perplexity stays comparable between runs. More targets a step train "
        "the prediction head faster: perplexity 94 against 107 at 15% (see README: Speed).")
    group_texts: bool = Field(True, description="Concatenate texts into max_length blocks (else truncate each).")
    unigram_head_bias: bool = Field(
        True, description="A newly initialised prediction head starts with its output bias at the log-frequencies "
        "of the training tokens (a pretrained head is left as it is; full fine-tuning only: a LoRA adapter does not "
        "save that bias). Perplexity 85 against 94 at the defaults (see README: Speed).")
    top_k: int = Field(5, gt=0, description="Candidates returned by fill-mask prediction.")


def _unwrap(model):
    """The transformers model inside a DDP/accelerate wrapper and a PeftModel (LoRA layers are injected into it)."""
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


# Per model class: does the sparse head give the full head's logits? Checked once per class and process.
_SPARSE_OK: dict[type, bool] = {}


def _sparse_logits(model, base, features: dict, mask):
    """Runs `model` with a forward hook on its encoder (`base.base_model`) that keeps only the masked positions'
    hidden states, as one row of M positions: the masked-LM head, whatever its modules (BERT `cls`, RoBERTa
    `lm_head`, DistilBERT `vocab_*`, ELECTRA `generator_*`, DeBERTa `lm_predictions`, ModernBERT `head`+`decoder`),
    then runs on those M positions only. Calling `model` itself keeps DDP's gradient sync and accelerate's
    autocast."""
    def keep_masked(module, args, output):
        output["last_hidden_state"] = output["last_hidden_state"][mask].unsqueeze(0)
        return output

    handle = base.base_model.register_forward_hook(keep_masked)
    try:
        return model(**features).logits.squeeze(0)
    finally:
        handle.remove()


def _sparse_ok(base, features: dict, mask) -> bool:
    """Once per model class: the sparse head's logits equal the full forward's at the masked positions (fp32, eval
    mode, no gradient), i.e. the head is position-wise. A family whose head is not, or whose encoder output does
    not fit, falls back to the full head, with one warning."""
    import torch

    cls = type(base)
    if cls not in _SPARSE_OK:
        ok, why = False, ""
        was_training = base.training
        base.eval()
        try:
            with torch.no_grad(), torch.autocast(features["input_ids"].device.type, enabled=False):
                full = base(**features).logits[mask].float()
                sparse = _sparse_logits(base, base, features, mask).float()
            ok = sparse.shape == full.shape and torch.allclose(sparse, full, rtol=1e-4, atol=1e-4)
            why = "" if ok else f"its logits differ (shape {tuple(sparse.shape)} vs {tuple(full.shape)})"
        except Exception as e:  # noqa: BLE001 -- any failure means: use the full head
            why = f"{type(e).__name__}: {e}"
        finally:
            base.train(was_training)
        _SPARSE_OK[cls] = ok
        if not ok:
            run_logger(__name__).warning(
                "%s: the masked-LM head cannot run on the masked positions alone (%s); using the full head over "
                "every position (same loss, more work)", cls.__name__, why)
    return _SPARSE_OK[cls]


def masked_lm_logits(model, inputs: dict):
    """Logits at the masked positions only, shape (M, vocab), in row-major order of `labels != -100`, and the
    M target ids. No shift: position i is scored against the original token at position i.

    The prediction head is a hidden x vocab matmul (30,522 columns for BERT): on MiniLM it costs about as much as
    the six encoder layers. Only ~15% of positions carry a label, so running the head there alone skips ~85% of
    that work without changing the loss or its gradients (unmasked positions contribute nothing to either). Any
    family: see `_sparse_logits`; a model where that does not reproduce the full head falls back to it."""
    labels = inputs["labels"]
    mask = labels != -100
    features = {k: v for k, v in inputs.items() if k != "labels"}
    base = _unwrap(model)
    if getattr(base, "base_model", base) is not base and _sparse_ok(base, features, mask):
        logits = _sparse_logits(model, base, features, mask)
    else:
        logits = model(**features).logits[mask]
    return logits, labels[mask]


def masked_lm_loss(model, batch: dict):
    """The plain loop's training loss: mean cross-entropy over the batch's masked tokens, the model's own
    `outputs.loss`, with the head run on the masked positions only (see `masked_lm_logits`)."""
    import torch.nn.functional as F

    logits, targets = masked_lm_logits(model, batch)
    return F.cross_entropy(logits.float(), targets)


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

    was_training = model.training
    model.eval()
    nll, hits, n = 0.0, 0, 0
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, leave=False, disable=not progress_bars()):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, dtype):
                logits, targets = masked_lm_logits(model, batch)
            a, b, c = _masked_counts(logits, targets)
            nll, hits, n = nll + a, hits + b, n + c
    model.train(was_training)
    return mlm_metrics(nll, hits, n)


def sft_trainer_class():
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
        Evaluation is the job's own `evaluate` (the core replaces Trainer.evaluate with it)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # Mixed precision, entered here explicitly (accelerate's wrapped `forward` does the same; nesting is
            # harmless). Without it the step ran in fp32: 1.0 s a step against 0.59 s in bf16 (MiniLM, batch 16 x
            # 128, AVX512-BF16 CPU).
            with self.accelerator.autocast():
                logits, targets = masked_lm_logits(model, inputs)
            nll = F.cross_entropy(logits.float(), targets, reduction="sum")
            # Trainer passes the masked-token count of the whole accumulated batch when it can; else a batch mean.
            denom = num_items_in_batch if num_items_in_batch is not None else targets.numel()
            loss = nll / (denom.clamp(min=1) if hasattr(denom, "clamp") else max(int(denom), 1))
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # the count spans all ranks; DDP averages gradients
            return (loss, MaskedLMOutput(loss=loss, logits=logits)) if return_outputs else loss

        def train(self, *args, **kwargs):
            out = super().train(*args, **kwargs)
            self.model.__dict__.pop("forward", None)  # drop TRL's fused-head forward patch; the class forward stays
            return out

    return MaskedLMSFTTrainer


def build_sft_config(spec: JobSpec, output_dir: str, kwargs: dict, **overrides):
    """The SFTConfig the job maps onto. The data arrive tokenized, grouped and (for eval) masked, so TRL's own
    preparation (chat templates, EOS appending, causal labels) is skipped."""
    from trl import SFTConfig

    args = dict(
        output_dir=output_dir,
        **kwargs,  # bf16/fp16 follow our precision (TRL would turn bf16 on)
        max_length=spec.data.max_length,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,  # the collator needs special_tokens_mask; it hands the model only inputs
        label_names=["labels"],
        activation_checkpointing=False,  # TRL turns it on by default: recompute costs ~30%, BERT-size models fit
    )
    args.update(overrides)
    return SFTConfig(**args)


def load_model(path: str, spec: JobSpec):
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized" notice is reported once by check_model instead

    try:  # never unpickle weights; the loading info tells which weights are new (a head the checkpoint lacks)
        return mark_new_weights(*AutoModelForMaskedLM.from_pretrained(path, use_safetensors=True,
                                                                      output_loading_info=True))
    finally:
        hf_logging.set_verbosity(verbosity)


def init_head_bias(model, tokenized_path: str, spec: JobSpec) -> None:
    """A newly initialised MLM head (HF zeros its output bias) gives every word the same prior: its epoch-0
    perplexity was 47,909 on the embedded data, worse than uniform over the 30,522-token vocabulary. Its output
    bias is set to the log-frequencies of the training split's non-special tokens (add-0.1 smoothing, centred), the
    prior a trained head learns first (1,416 at epoch 0). The optimizer cannot move it there itself: at a learning
    rate of 3e-4 AdamW shifts a bias by at most about 3e-4 a step, and log-frequencies span over 10 nats. Measured:
    perplexity 85.1 against 94.4 after the default run, in the same time. A pretrained head (any non-zero bias) is
    left alone."""
    import numpy as np
    import pyarrow.compute as pc
    import torch
    from datasets import load_from_disk

    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    if not spec.opts.unigram_head_bias or bias is None or bool(torch.count_nonzero(bias)):
        return
    table = load_from_disk(tokenized_path)["train"].data
    ids = pc.list_flatten(table.column("input_ids")).to_numpy()
    if "special_tokens_mask" in table.column_names:
        ids = ids[pc.list_flatten(table.column("special_tokens_mask")).to_numpy() == 0]
    counts = np.bincount(ids, minlength=bias.numel())[: bias.numel()].astype(np.float64) + 0.1
    logp = np.log(counts / counts.sum())
    with torch.no_grad():
        bias.copy_(torch.from_numpy(logp - logp.mean()).to(bias.dtype))


def tokenize(data_path: str, model: str, spec: JobSpec) -> str:
    o = spec.opts
    return tokenize_for_mlm(data_path, model, spec.data.max_length, o.group_texts, o.mlm_probability, spec.train.seed)


def training_mask_probability(opts) -> float:
    """The share masked in training batches: train_mlm_probability, else mlm_probability (the eval masks' rate)."""
    return opts.train_mlm_probability or opts.mlm_probability


def collator(tok, spec: JobSpec):
    """Training batches masked at `training_mask_probability`; eval rows come pre-masked."""
    return MLMBatchCollator(tok, training_mask_probability(spec.opts), spec.train.seed)


def check_model(model: str, max_length: int) -> dict:
    """A mask token and a masked-LM head class are required; a checkpoint without a trained MLM head is warned
    about: its fill-mask answers are noise until fine-tuned."""
    info = check(model, max_length, masked_lm=True)
    if not info["has_mlm_head"]:
        run_logger(__name__).warning(
            "model %r ships no masked-LM head: its prediction head is newly initialised, so "
            "fill-mask output is noise until it is fine-tuned; expect a high epoch-0 loss. A checkpoint trained "
            "for MLM (e.g. bert-base-uncased) starts from a working head.", model,
        )
    return info


def data_stats(tokenized_path: str) -> dict:
    return {k: v for k, v in mlm_stats(tokenized_path).items() if k not in ("group_texts", "max_length")}


def run_tags(info: dict, data) -> dict:
    return {"mlm_head": "pretrained" if info.get("has_mlm_head") else "newly initialised",
            "mask_token": info.get("mask_token")}


def example_from(text: str) -> str | None:
    """A fill-mask input made from an eval text: one word near the middle (letters only, 4 or more) becomes
    [MASK]; None when there is no such word."""
    words = text.split()
    candidates = [i for i, w in enumerate(words) if w.isalpha() and len(w) >= 4]
    if not candidates:
        return None
    i = min(candidates, key=lambda j: abs(j - len(words) // 2))
    return " ".join([*words[:i], "[MASK]", *words[i + 1:]])


def check_prediction(out: list) -> str | None:
    cands = out[0]["masks"][0] if out and out[0].get("masks") else []
    if not cands or not all(math.isfinite(c["score"]) for c in cands):
        return f"malformed fill-mask answer {out!r}"
    return None


def baseline(data_path: str, history: list[dict], spec: JobSpec) -> dict[str, float]:
    """The quality floor: the model before fine-tuning, scored by the run's epoch-0 evaluation on the same
    held-out blocks and masks (history[0]). A version must beat it to become champion."""
    return epoch0_baseline(spec.recipe, history)


def artifacts(run_dir: str, model_dir: str, extras: dict, spec: JobSpec) -> tuple[list[str], str]:
    """Top-k candidates of the trained model (local checkpoint) on the example text: JSON for the run, text for the
    summary. `[MASK]` is mapped to the model's own mask token, as `finetune predict` does."""
    import json
    from pathlib import Path

    results = fill_mask(load_pipeline(model_dir, "fill-mask"), [EXAMPLE], spec.opts.top_k)
    path = Path(run_dir) / "eval" / "fill_mask_examples.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return [str(path)], "fill-mask with the trained model:\n" + format_predictions(results)


RECIPE = register(Recipe(
    name="mlm",
    description="Masked-LM fine-tuning through TRL's SFTTrainer, then fill-mask prediction.",
    example="finetune mlm --train-samples 1000 --no-group-texts --top-k 5",
    options=MLMOptions,
    registered_model="imdb-fill-mask",
    hf_task="fill-mask",
    metrics=("eval_loss", "perplexity", "eval_masked_accuracy"),
    promotion=Promotion("perplexity", {"perplexity": ("perplexity", False), "loss": ("eval_loss", False),
                                       "accuracy": ("eval_masked_accuracy", True)}),
    smoke_example=EXAMPLE,
    tokenize=tokenize,
    load_model=load_model,
    collator=collator,
    evaluate=evaluate_mlm,
    trainer_class=lambda spec: sft_trainer_class(),
    trainer_args=build_sft_config,
    predict=predict_fill_mask,
    check_prediction=check_prediction,
    check_model=check_model,
    init_model=init_head_bias,
    loss=masked_lm_loss,
    data_stats=data_stats,
    run_tags=run_tags,
    artifacts=artifacts,
    eval_before_training=True,
    example_from=example_from,
    baseline=baseline,
    baseline_name="untrained-model (epoch 0)",
    needs_labels=False,
    data_defaults={"label_column": None},
    # The bundled MiniLM's MLM head starts untrained, so updates are what it lacks most. One epoch of
    # grouped 128-token blocks (measured here, 2 cores, fixed eval masks): perplexity 195 with 1,000
    # reviews at batch 16; 157.6 at batch 8 (same time); 107.0 with 2,000 at batch 8 (196 s of training); 94.4 with
    # training masks at 30% (236 s). A learning rate of 1e-3 (207.6) or 2e-3 (diverged) did worse than 3e-4, and
    # 5e-5 reached 619 (an earlier run at batch 16). Batch 8 is also what HF's run_mlm uses by default. Then the
    # new head: output bias from unigram frequencies (init_head_bias) 85.1; the head at 10x the rate 73.7 (30x:
    # 74.4), the whole job 242.8 s.
    embedded_defaults={"train_samples": 2000, "eval_samples": 200},
    train_defaults={"batch_size": 8, "head_learning_rate_scale": 10.0},
    learning_rate=3e-4,
    config_name="MLMConfig",
))
