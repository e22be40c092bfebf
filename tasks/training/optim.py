"""One optimizer builder for both engines: AdamW parameter groups (the no-decay rule by module type, new weights at
their own rate), the warmup + decay schedule from the global batch, and the resume check of a checkpoint's groups.
The plain loop and the Trainer adapter both call `build_optimizer` (Trainer gets it through `optimizers=`), so the
two engines train the same groups."""
from __future__ import annotations

import math

from tasks.common import ConfigError
from tasks.training.config import TrainConfig
from tasks.training.prepare import NEW_WEIGHTS, fused_adamw_supported


def is_norm_module(module) -> bool:
    """A normalisation layer, by type: torch's norm layers (LayerNorm, RMSNorm, GroupNorm, BatchNorm...) and any
    module class named `*Norm` (a family's own RMSNorm/LayerNorm class), whatever its parameters are called."""
    import torch

    norms = tuple(c for c in (torch.nn.LayerNorm, getattr(torch.nn, "RMSNorm", None), torch.nn.GroupNorm,
                              torch.nn.modules.batchnorm._NormBase) if c is not None)
    return isinstance(module, norms) or type(module).__name__.endswith("Norm")


def no_decay_parameter_names(model) -> set[str]:
    """Full names of the parameters that get no weight decay: every parameter of a normalisation layer (found by
    module type, see `is_norm_module`) and every bias (a module's parameter named `bias`)."""
    out = set()
    for mod_name, module in model.named_modules():
        norm = is_norm_module(module)
        for p_name, _ in module.named_parameters(recurse=False):
            if norm or p_name == "bias":
                out.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return out


def param_groups(model, t: TrainConfig) -> list[dict]:
    """AdamW groups: no decay for normalisation layers and biases (`no_decay_parameter_names`); the new weights
    (see `mark_new_weights`) at `head_learning_rate_scale` x learning_rate when that is not 1. A new head has
    everything to learn, the pretrained body little: measured on the mlm default, a 10x head rate took perplexity
    from 85.1 to 73.7. The two pretrained groups always exist (checkpointed optimizer layouts)."""
    no_decay = no_decay_parameter_names(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # LoRA: adapters (+ head) only
    new = getattr(model, NEW_WEIGHTS, set()) if t.head_learning_rate_scale != 1 else set()
    groups = []
    for is_new in (False, True):
        for decay in (True, False):
            ps = [p for n, p in params if (id(p) in new) == is_new and (n not in no_decay) == decay]
            if ps or (not is_new):
                groups.append({"params": ps, "weight_decay": t.weight_decay if decay else 0.0,
                               "lr": t.learning_rate * (t.head_learning_rate_scale if is_new else 1.0)})
    return groups


def build_optimizer(model, t: TrainConfig, device=None):
    """THE optimizer of both engines: AdamW over `param_groups` (torch's fused kernel where it runs)."""
    import torch

    return torch.optim.AdamW(param_groups(model, t), lr=t.learning_rate,
                             fused=device is not None and fused_adamw_supported(device))


def warmup_steps(t: TrainConfig, steps_per_epoch: int) -> int:
    """Warmup in optimizer steps: `warmup_ratio` of all steps, where a step is one GLOBAL batch (batch_size x
    processes x gradient_accumulation_steps), so N processes or k accumulated batches warm up over the same share
    of training as one."""
    return math.ceil(t.warmup_ratio * steps_per_epoch * t.epochs)


def optimizer_steps(batches: int, accumulation: int) -> int:
    """Optimizer steps over `batches` batches of one process when every `accumulation` of them make a step, and
    the epoch's last, shorter group too (as transformers' Trainer counts them)."""
    return max(1, math.ceil(batches / max(accumulation, 1)))


def global_steps_per_epoch(examples: int, t: TrainConfig, world_size: int) -> int:
    """Optimizer steps per epoch when `world_size` processes each take `batch_size` examples a forward pass and
    `gradient_accumulation_steps` passes a step (the last batch and the last group of an epoch may be short)."""
    return optimizer_steps(math.ceil(examples / (t.batch_size * max(world_size, 1))), t.gradient_accumulation_steps)


def check_optimizer_groups(checkpoint, saved, built) -> None:
    """A checkpoint's optimizer state loads only into the parameter groups it was saved with: say so in one line
    before anything loads. `saved`/`built`: the group count, or the list of group sizes (then a checkpoint written
    before the no-decay rule by module type, whose groups hold other parameters, is caught too)."""
    saved_n = saved if isinstance(saved, int) else len(saved)
    built_n = built if isinstance(built, int) else len(built)
    if saved_n != built_n:
        raise ConfigError(
            f"checkpoint {checkpoint} holds an optimizer with {saved_n} parameter groups, this run builds {built_n}: "
            "resume with the settings it was written with (a checkpoint from before --head-learning-rate-scale: "
            "--head-learning-rate-scale 1)")
    if not isinstance(saved, int) and not isinstance(built, int) and list(saved) != list(built):
        raise ConfigError(
            f"checkpoint {checkpoint} holds an optimizer whose parameter groups have {list(saved)} parameters, this "
            f"run builds {list(built)} (the no-decay rule now goes by module type): start the run afresh (without "
            "--resume, or with another --output-dir), or resume it with the version that wrote it")


def group_sizes(param_groups_state: list[dict]) -> list[int]:
    return [len(g["params"]) for g in param_groups_state]


def _optimizer_and_scheduler(model, t: TrainConfig, steps_per_epoch: int, device=None):
    """`build_optimizer`; warmup (`warmup_steps`) then the configured decay; `steps_per_epoch` counts global
    batches."""
    from transformers import get_scheduler

    opt = build_optimizer(model, t, device)
    total = steps_per_epoch * t.epochs
    sched = get_scheduler(t.lr_scheduler, opt, num_warmup_steps=warmup_steps(t, steps_per_epoch),
                          num_training_steps=total)
    return opt, sched, total
