"""Complete, atomic training checkpoints: written to a temporary dir, fsynced, then renamed into place, with a
checksum so a truncated or corrupt checkpoint is detected and skipped in favour of the previous complete one.

Safe loading: a checkpoint holds only tensors and plain Python values (the RNG states as ints, lists and tensors,
the config in its JSON form), so it loads with `torch.load(weights_only=True)`: no pickled code runs. A checkpoint
written before this format (numpy RNG state as an ndarray) loads the same way with exactly numpy's array types
allowed; anything else that would need full unpickling is refused (skipped with a warning)."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

from tasks.common import atomic_dir

log = logging.getLogger(__name__)
STATE = "state.pt"
MARKER = "COMPLETE.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state(loader_gen=None) -> dict:
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    # plain types only (no ndarray): the checkpoint must load with torch.load(weights_only=True)
    st = {"python": random.getstate(),
          "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import numpy as np
    import torch

    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = st["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _collator_rngs(collate_fn) -> list:
    """The objects behind a collate function that draw masks from a seeded torch.Generator (transformers' MLM
    collator, possibly inside a wrapper such as tasks.mlm_data.MLMBatchCollator): those with `seed` and
    `create_rng`, the collate function itself and the objects it holds."""
    cands = [collate_fn, *(vars(collate_fn).values() if hasattr(collate_fn, "__dict__") else ())]
    return [c for c in cands if getattr(c, "seed", None) is not None and hasattr(c, "create_rng")]


def collator_rng_state(collate_fn) -> list | None:
    """The masking collator's generator state(s), so a resumed epoch draws the masks the uninterrupted run draws
    (its skipped batches are not collated again). None: no seeded collator, or its generator is not made yet."""
    import torch

    out = [c.generator.get_state() if isinstance(getattr(c, "generator", None), torch.Generator) else None
           for c in _collator_rngs(collate_fn)]
    return out if any(s is not None for s in out) else None


def set_collator_rng_state(collate_fn, states: list | None) -> None:
    if not states:
        return
    for c, st in zip(_collator_rngs(collate_fn), states):
        if st is not None:
            c.create_rng("pt")  # made on first use otherwise (and again in a new process)
            c.generator.set_state(st)


def _numpy_array_globals() -> list:
    """Exactly what unpickling a numpy array needs (checkpoints written before RNG states were plain, or states that
    hold arrays)."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    # the dtype classes (Int64DType, Float64DType, ...) are plain descriptions of data: safe to allow, all of them
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")] if hasattr(np, "dtypes") else []
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), *dtypes]


def safe_load(path: str | Path):
    """torch.load with weights_only=True: tensors, containers and numbers only, never arbitrary pickled objects."""
    import torch

    with torch.serialization.safe_globals(_numpy_array_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def save_checkpoint(ckpt_root: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Atomic: a crash (or a full disk) leaves either the new complete checkpoint or none, and the previous ones
    untouched. Old checkpoints beyond `keep` are pruned only after the new one is complete."""
    import torch

    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    try:
        with atomic_dir(final) as tmp:
            buf = io.BytesIO()  # serialise in memory first, so a full disk surfaces as a plain OSError on write
            torch.save(state, buf)
            with (tmp / STATE).open("wb") as f:
                f.write(buf.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            marker = {"step": step, "epoch": state.get("epoch"), "sha256": _sha256(tmp / STATE)}
            (tmp / MARKER).write_text(json.dumps(marker))
    except OSError as e:
        orig = e.__cause__ if isinstance(e.__cause__, OSError) else e  # not atomic_dir's rewording
        raise OSError(orig.errno, f"could not write checkpoint {final.name} under {root}: {orig.strerror}. Free "
                      "disk space or point --output-dir at a writable location; the previous checkpoint is intact"
                      ) from orig
    complete = sorted(p for p in root.glob("step-*") if (p / MARKER).exists())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest_checkpoint(ckpt_root: str | Path) -> tuple[Path, dict] | None:
    """Newest checkpoint whose checksum matches and that loads; corrupt ones are skipped with a warning."""

    root = Path(ckpt_root)
    if not root.exists():
        return None
    for cand in sorted(root.glob("step-*"), reverse=True):
        try:
            marker = json.loads((cand / MARKER).read_text())
            if _sha256(cand / STATE) != marker["sha256"]:
                raise ValueError("checksum mismatch")
            state = safe_load(cand / STATE)
            return cand, state
        except Exception as e:  # truncated, missing marker, corrupt pickle...
            log.warning("skipping incomplete or corrupt checkpoint %s: %s", cand, e)
    return None
