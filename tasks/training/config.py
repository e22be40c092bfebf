"""The training step's config schemas and results: `TrainConfig`, `LoraConfig` (sections of every job's config),
`TrainResult` and `FitOutput`. Pydantic only: the jobs, the CLI and the ranks import these without the training
code (no import circle training <-> distributed <-> jobs)."""
from __future__ import annotations

from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.common import EMBEDDED_MODEL, PROJECT_ROOT

MetricsFn = Callable[[dict, int], None]
# Called after each evaluation during training with (epoch, that evaluation's metrics); it may stop the run by
# raising (a sweep's pruner: tasks.search.TrialPruned), which propagates out of `train` as it is.
EvalHook = Callable[[int, dict], None]


class StopTraining(Exception):
    """What an `EvalHook` raises to stop a run on purpose (a pruned sweep trial): not a failure to retry."""

STEP_LOSS = "train_loss_step"  # the step-level series; `train_loss` stays the per-epoch mean (step = epoch)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        EMBEDDED_MODEL,
        description=f"Hub id or local path of a BERT-family checkpoint; '{EMBEDDED_MODEL}' is the offline MiniLM.",
    )
    epochs: int = Field(1, gt=0, description="Passes over the training data.")
    batch_size: int = Field(
        16, gt=0, description="Examples per forward pass and process; an optimizer step takes batch_size x "
                              "processes x gradient_accumulation_steps (the global batch).",
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Forward/backward passes whose gradients are summed before each optimizer step: a "
                             "larger global batch in the memory of one batch_size. Warmup, steps per epoch and the "
                             "train_loss_step axis count optimizer steps.",
    )
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
        "(BERT/RoBERTa/ELECTRA: query, value; DeBERTa-v2: query_proj, value_proj), or all linear layers but the "
        "output head where peft has none (DistilBERT, ModernBERT)."
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
    new_weights: list[str] = []  # weights the starting checkpoint did not ship (`mark_new_weights`: a new head)


class FitOutput(BaseModel):
    history: list[dict]
    samples_per_second: float = 0.0
    resumed_from: str | None = None
    selected_epoch: int | None = None  # the epoch whose weights the model holds after fit (None: the last row)
    steps_per_epoch: int | None = None


def loss_log_every(t: TrainConfig, total_steps: int) -> int:
    """Steps between two `train_loss_step` points: `logging_steps`, else 20 to 40 points per run (every step of a
    run shorter than 20 steps)."""
    return t.logging_steps or max(1, total_steps // 20)
