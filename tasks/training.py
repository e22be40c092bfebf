"""The one training core for every job: setup -> fit (the plain PyTorch loop, or the job's HF Trainer class)
-> atomic save, returning a typed `TrainResult`. What differs between jobs comes from their recipe
(`tasks/jobs/`); nothing here switches on a job's name."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.common import EMBEDDED_MODEL, PROJECT_ROOT


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        EMBEDDED_MODEL,
        description=f"Hub id or local path of a BERT-family checkpoint; '{EMBEDDED_MODEL}' is the offline MiniLM.",
    )
    epochs: int = Field(1, gt=0, description="Passes over the training data.")
    batch_size: int = Field(16, gt=0, description="Examples per optimizer step.")
    eval_batch_size: int = Field(64, gt=0, description="Examples per evaluation batch.")
    learning_rate: float = Field(5e-5, gt=0.0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay (not applied to biases/LayerNorm).")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of steps with linear warmup.")
    lr_scheduler: str = Field("linear", description="transformers scheduler name (linear, cosine, constant...).")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    seed: int = Field(42, description="Seeds data subsets, shuffling, initialisation and dropout.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 (or fp16) autocast on a GPU, fp32 on the CPU."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto: a GPU when present.")
    output_dir: str = Field(
        str(PROJECT_ROOT / "outputs"), description="Where checkpoints, resolved config and metrics are written."
    )
    checkpoint_every_steps: int | None = Field(
        None, gt=0, description="Also checkpoint every N optimizer steps (always at each epoch end)."
    )
    resume: bool = Field(False, description="Resume from the last complete checkpoint in the run's output dir.")


class LoraConfig(BaseModel):
    """LoRA adapters through the `peft` library (used when `peft: lora`). Defaults suit BERT-family encoders."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, gt=0, description="Rank of the low-rank update matrices.")
    alpha: int = Field(16, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    target_modules: list[str] = Field(
        ["query", "value"], description="Names of the modules that get adapters (BERT attention: query, value)."
    )
