"""Checkpoints of the single-file format the plain loop wrote before it used accelerate's `save_state` (up to commit
f16552a): `state.pt` (model, optimizer, scheduler, RNG states, position, history, spec) and COMPLETE.json with that
file's sha256. Tests write them the way that code did, to check that such checkpoints still resume: `write_single_file`
is its writer, `rng_state` its RNG state, `to_single_file` turns a checkpoint of today's layout into one."""
from __future__ import annotations

import json
import random
from pathlib import Path


def rng_state() -> dict:
    """Python's, numpy's (as plain values and a tensor) and torch's global RNG states, as that format stored them."""
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "torch": torch.get_rng_state()}


def write_single_file(root: str | Path, step: int, state: dict) -> Path:
    """`state` as `root/step-XXXXXXXX/state.pt` with its marker (no staging: tests only)."""
    import torch

    from tasks.checkpoint import MARKER, STATE, _sha256

    folder = Path(root) / f"step-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / STATE)
    (folder / MARKER).write_text(json.dumps({"step": step, "epoch": state.get("epoch"),
                                             "sha256": _sha256(folder / STATE)}))
    return folder


def _rng_of(accelerate_states: dict) -> dict:
    """accelerate's random_states_{rank}.pkl content in the single-file format's form."""
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = accelerate_states["numpy_random_seed"]
    return {"python": accelerate_states["random_state"],
            "numpy": (str(name), torch.from_numpy(np.asarray(keys).astype(np.int64)), int(pos), int(has_gauss),
                      float(cached)),
            "torch": accelerate_states["torch_manual_seed"]}


def to_single_file(folder: Path, per_rank: bool = True) -> dict:
    """Rewrites a checkpoint folder of today's layout (a model without tied weights: classify) in the single-file
    format, in place. per_rank: the format with every rank's RNG state, the world size and the loss scaler (keys
    `rng_by_rank`, `world_size`, `scaler`); else the one-RNG format of the pre-accelerate loop (commit 3ae0c12).
    Returns the state written."""
    import torch
    from accelerate.utils import load
    from safetensors.torch import load_file

    from tasks.checkpoint import LOOP_STATE, rank_file, rng_file, safe_load

    own = safe_load(folder / LOOP_STATE)
    world = own["world_size"]
    ranks = [{"rng": _rng_of(load(folder / rng_file(r))), **safe_load(folder / rank_file(r))} for r in range(world)]
    scaler = folder / "scaler.pt"
    state = {"model": load_file(folder / "model.safetensors"),
             "optimizer": torch.load(folder / "optimizer.bin", weights_only=True),
             "scheduler": own["scheduler"], "rng": ranks[0]["rng"], "epoch_start_gen_state": ranks[0]["loader_gen"],
             **{k: own[k] for k in ("epoch", "batches_done", "epoch_loss", "step", "history", "best_state", "config")}}
    if per_rank:
        state.update(rng_by_rank=ranks, world_size=world,
                     scaler=torch.load(scaler, weights_only=True) if scaler.exists() else None)
    for f in folder.iterdir():
        f.unlink()
    write_single_file(folder.parent, own["step"], state)
    return state
