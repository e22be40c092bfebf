"""Best-epoch selection and early stopping: one rule for both engines, computed from the per-epoch history."""
from __future__ import annotations

import math

from pydantic import BaseModel


class Progress(BaseModel):
    """Where a run stands by its selection metric, computed from the per-epoch history alone (so it survives a
    resume with the history): the best epoch so far and how many epochs have passed without improving on it."""

    best_epoch: int | None = None
    best_value: float | None = None
    epochs_without_improvement: int = 0

    def should_stop(self, patience: int | None) -> bool:
        return bool(patience) and self.epochs_without_improvement >= patience


def track_best(history: list[dict], key: str, higher_is_better: bool) -> Progress:
    """The best epoch by `key`: a strict improvement over the best so far (a tie keeps the earlier epoch); a
    missing or non-finite value (a diverged run) never counts. Epoch 0 (the untrained model, for jobs that evaluate
    before training) is not a candidate: a run registers trained weights."""
    p = Progress()
    for row in history:
        if row.get("epoch", 0) < 1:
            continue
        v = row.get(key)
        ok = isinstance(v, (int, float)) and math.isfinite(v)
        if ok and (p.best_value is None or (v > p.best_value if higher_is_better else v < p.best_value)):
            p.best_epoch, p.best_value, p.epochs_without_improvement = row["epoch"], float(v), 0
        else:
            p.epochs_without_improvement += 1
    return p

def _cpu_copy(state: dict) -> dict:
    """A detached CPU copy of a (possibly nested, for LoRA) state dict: the best epoch's weights, kept aside."""
    import torch

    return {k: _cpu_copy(v) if isinstance(v, dict) else v.detach().to("cpu", copy=True)
            if isinstance(v, torch.Tensor) else v for k, v in state.items()}
