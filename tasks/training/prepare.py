"""Setup shared by both engines: the model as training starts from it (step-cost choices, new-weights record,
LoRA), the attention switch, the loaders, resume on a Prefect retry."""
from __future__ import annotations

from typing import TYPE_CHECKING

from tasks import adapters
from tasks.adapters import NEW_WEIGHT_NAMES, NEW_WEIGHTS
from tasks.base_model import resolve_model
from tasks.common import run_logger
from tasks.distributed import loader_options, rank_seed, world_size
from tasks.loaders import build_dataloaders
from tasks.training.config import TrainConfig

if TYPE_CHECKING:
    from tasks.jobs import JobSpec


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

def resume_on_retry(spec: "JobSpec") -> "JobSpec":
    """A Prefect retry of the training task continues from the last complete checkpoint instead of restarting. A
    process without Prefect loaded (a training rank: the launcher applied this already) is not a task run."""
    import sys

    if "prefect" not in sys.modules:
        return spec
    try:
        from prefect.runtime import task_run

        if (task_run.run_count or 1) > 1 and not spec.train.resume:
            return spec.model_copy(update={"train": spec.train.model_copy(update={"resume": True})})
    except Exception:
        pass
    return spec


def build_loaders(tokenized_path: str, spec: "JobSpec", tokenizer=None, rank: int = 0) -> dict:
    """Train (seeded shuffle) and eval loaders with the job's collator: the eval loader is the one every
    evaluation of the job uses (each epoch, both engines, promotion). Rank r > 0 of a data-parallel run gets a
    training collator seeded for its rank (its own MLM masks). On CUDA, worker processes and pinned memory
    (`tasks.distributed.loader_options`); on the CPU none, as before."""
    from transformers import AutoTokenizer

    t = spec.train
    tok = tokenizer or AutoTokenizer.from_pretrained(resolve_model(t.model))
    loaders = build_dataloaders(tokenized_path, t.model, t.batch_size, t.eval_batch_size, t.seed,
                                collator=spec.recipe.collator(tok, spec), group_by_length=t.group_by_length)
    if rank:
        loaders["train"].collate_fn = spec.recipe.collator(tok, spec_for_rank(spec, rank))
    opts = loader_options(loader_device_type(t), world_size())
    return {k: with_loader_options(dl, **opts) for k, dl in loaders.items()} if opts else loaders


def spec_for_rank(spec: "JobSpec", rank: int) -> "JobSpec":
    """The spec whose seed is the rank's (`tasks.distributed.rank_seed`): for what must differ between ranks."""
    if not rank:
        return spec
    return spec.model_copy(update={"train": spec.train.model_copy(update={"seed": rank_seed(spec.train.seed, rank)})})


def loader_device_type(t: TrainConfig) -> str:
    """The device type the run will train on (for DataLoader settings chosen before the model is loaded)."""
    import torch

    if t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def with_loader_options(dl, **opts):
    """The same DataLoader (dataset, batch size, sampler and its generator, collator) with other settings."""
    from torch.utils.data import DataLoader

    return DataLoader(dl.dataset, batch_size=dl.batch_size, sampler=dl.sampler, generator=dl.generator,
                      collate_fn=dl.collate_fn, drop_last=dl.drop_last, **opts)


def mark_new_weights(model, loading_info: dict):
    """Records on the model which of its parameters the checkpoint did not ship (transformers' loading info
    `missing_keys`: a new head), so that `head_learning_rate_scale` can find them; returns the model."""
    missing = set(loading_info.get("missing_keys", ()))
    setattr(model, NEW_WEIGHTS, {id(p) for n, p in model.named_parameters() if n in missing})
    setattr(model, NEW_WEIGHT_NAMES, sorted(n for n, _ in model.named_parameters() if n in missing))
    return model

def model_for_training(spec: "JobSpec", tokenized_path: str, device):
    """The model as training starts from it, and its tokenizer: the job's model (its head), the recipe's
    initialisation of new weights, the step-cost choices, LoRA adapters when asked, on the device. Shared by
    `train` and bench/bench_gpu.py, so that the bench measures the step a run takes."""
    from transformers import AutoTokenizer

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
