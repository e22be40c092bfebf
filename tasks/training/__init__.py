"""The training step, a small package:

    config.py         TrainConfig, LoraConfig, TrainResult, FitOutput (pydantic only)
    selection.py      best-epoch selection and early stopping (one rule for both engines)
    prepare.py        the model as training starts from it, attention switch, loaders
    optim.py          the one optimizer builder (parameter groups, no-decay rule) and schedule
    loop.py           the plain loop on accelerate.Accelerator (engine `manual`), 1 or N processes
    trainer.py        the Trainer adapter (the job's HF Trainer / TRL class)
    core.py           `train`: setup -> fit -> atomic save
    prefect_tasks.py  `train_task`, `build_loaders_task`: the Prefect wrappers, for the flows

Every name other modules import from `tasks.training` still resolves here. The config schemas load eagerly (they
are pydantic only); everything else loads on first use, so `from tasks.training import TrainConfig` pulls in
neither torch nor Prefect, and the ranks (`python -m tasks.distributed`) never import Prefect."""
from __future__ import annotations

import importlib

from tasks.training.config import (STEP_LOSS, FitOutput, LoraConfig, MetricsFn, TrainConfig, TrainResult,
                                   loss_log_every)

_LAZY = {
    "selection": ("Progress", "track_best", "_cpu_copy"),
    "prepare": ("prepare_for_training", "training_attention", "attention_implementation", "fused_adamw_supported",
                "resume_on_retry", "build_loaders", "NEW_WEIGHTS", "mark_new_weights", "model_for_training",
                "spec_for_rank", "with_loader_options"),
    "optim": ("param_groups", "no_decay_parameter_names", "check_optimizer_groups", "build_optimizer",
              "_optimizer_and_scheduler", "warmup_steps", "global_steps_per_epoch", "optimizer_steps",
              "group_sizes", "is_norm_module"),
    "loop": ("fit_manual",),
    "trainer": ("hf_training_kwargs", "with_seeded_length_groups", "trainer_metric_name", "with_job_evaluation",
                "history_from_trainer", "last_complete_trainer_checkpoint", "quiet_trainer_output",
                "model_loss_per_batch", "fit_hf"),
    "core": ("train", "save_model_dir", "write_run_files"),
    "prefect_tasks": ("train_task", "build_loaders_task", "retry_unless_config_error"),
}
_WHERE = {name: mod for mod, names in _LAZY.items() for name in names}

__all__ = ["STEP_LOSS", "FitOutput", "LoraConfig", "MetricsFn", "TrainConfig", "TrainResult", "loss_log_every",
           *_WHERE]


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'tasks.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tasks.training.{mod}"), name)
    globals()[name] = value
    return value
