"""Training checkpoints of the plain loop: accelerate's `save_state` folder, made atomic and checked.

A checkpoint is a folder `<run>/checkpoints/step-XXXXXXXX` holding
- what `Accelerator.save_state` writes: the model (`model.safetensors`; with LoRA the adapter and the head only,
  through save/load pre-hooks), the optimizer (`optimizer.bin`), the loss scaler (`scaler.pt`, fp16 only) and each
  process's global RNG states (`random_states_{rank}.pkl`: python, numpy, torch and the GPU's, written by that
  process);
- what accelerate does not hold, in the project's own files: `loop_state.pt` (rank 0: the position in training —
  epoch, batches of it done, optimizer step —, the history, the partial epoch's loss sums, the best epoch's weights,
  the LR scheduler (the loop steps it only when the optimizer stepped, so it is not `prepare`d), the optimizer's
  group sizes, the world size, the job's spec as JSON, which holds the gradient accumulation) and `loop_rng_{rank}.pt` (each
  process's masking-collator generator and its loader generator at the epoch's start: masks and shuffles that
  accelerate's RNG file does not cover);
- `COMPLETE.json`: the sha256 of every other file in the folder, written last.

What the project adds to `save_state`/`load_state`, and why:
- Atomic: `save_state` writes straight into its folder (a crash leaves a torn one, a full disk a partial one). Here
  every process writes into one staging folder whose name all derive from the step (`.step-XXXXXXXX.tmp-staging`);
  after a barrier rank 0 checks that every process's files are there, fsyncs them, writes the marker and renames the
  folder into place, then prunes old checkpoints. A crash or a full disk at any point leaves the previous complete
  checkpoint, and a failure on any process stops every process with one error.
- Checked: a folder without its marker, or whose files do not match it (truncated, corrupt, missing), is skipped
  with a warning in favour of the previous one; in a data-parallel run rank 0 chooses and every rank resumes from
  that folder.
- RNG: `load_state` swallows a failure to load this process's `random_states_{rank}.pkl` (it logs "Could not load
  random states" at info level and goes on with the current RNG). The loop loads it first (`rng_file_problem`)
  and warns, so a resumed run never silently draws other random numbers than the interrupted one.

Safe loading: the project's files hold tensors and plain values only and load with `torch.load(weights_only=True)`;
accelerate loads its own files with weights_only=True too (numpy's RNG arrays allowed). A checkpoint written before
this format (one file, `state.pt`, with model, optimizer, scheduler, RNG states and position; its marker holds that
file's sha256) still resumes: `is_single_file` tells the loop to take that format's path. A numpy RNG state stored as
an ndarray (the oldest checkpoints) loads with exactly numpy's array types allowed; anything that would need full
unpickling is refused (skipped with a warning)."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

from tasks.common import ConfigError

log = logging.getLogger(__name__)
MARKER = "COMPLETE.json"
LOOP_STATE = "loop_state.pt"  # rank 0's: position, history, scheduler, best weights, spec
STATE = "state.pt"  # the single-file format that came before (model, optimizer, RNG and position in one file)
STAGING_SUFFIX = ".tmp-staging"


def rng_file(rank: int) -> str:
    """accelerate's RNG file of process `rank` (accelerate.utils.RNG_STATE_NAME)."""
    return f"random_states_{rank}.pkl"


def rank_file(rank: int) -> str:
    """The project's per-process file: the masking collator's and the loader's generators."""
    return f"loop_rng_{rank}.pt"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_state_file(path: Path, obj: Any) -> None:
    """torch.save, serialised in memory first (a full disk then surfaces as a plain OSError on write), fsynced."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    with path.open("wb") as f:
        f.write(buf.getbuffer())
        f.flush()
        os.fsync(f.fileno())


# --- RNG states of the single-file format, and the masking collator's generator ---------------------------------


def set_rng_state(st: dict) -> None:
    """Restores python's, numpy's and torch's global RNG from a single-file checkpoint's `rng` entry."""
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


# --- safe loading --------------------------------------------------------------------------------------------


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


# --- writing -------------------------------------------------------------------------------------------------


def staging_dir(root: str | Path, step: int) -> Path:
    """The folder every process of a run writes checkpoint `step` into: the same name on every rank."""
    return Path(root) / f".step-{step:08d}{STAGING_SUFFIX}"


def _storage_errno(e: BaseException) -> int | None:
    """The OS error behind a failed write, wherever the writer put it: an OSError's errno, safetensors' message
    ("I/O error: File too large (os error 27)"); torch.save writing straight to a file reports a short write as a
    RuntimeError of its zip writer, without the errno (EIO here)."""
    if isinstance(e, OSError):
        return e.errno or errno.EIO
    m = re.search(r"os error (\d+)", str(e))
    if m:
        return int(m.group(1))
    if isinstance(e, RuntimeError) and re.search(r"inline_container|PytorchStreamWriter|file write failed", str(e)):
        return errno.EIO
    return None


def _write_failure(e: BaseException | None, final: Path) -> BaseException:
    """One error for a checkpoint this process (e) or another one (None) could not write: storage problems name
    the fix; a bug or a ConfigError stays itself."""
    where = f"could not write checkpoint {final.name} under {final.parent}"
    keep = "the previous checkpoint is intact"
    if e is None:
        return OSError(errno.EIO, f"{where}: another process failed (its own error says why); {keep}")
    no = _storage_errno(e)
    if no is None:
        return e
    reason = os.strerror(no) if no != errno.EIO or isinstance(e, OSError) else f"a file was cut short ({_gist(e)})"
    return OSError(no, f"{where}: {reason}. Free disk space or point --output-dir at a writable location; {keep}")


def _rename_into_place(staging: Path, final: Path) -> None:
    """Atomic for readers: `final` is either the old folder or the new one (a run resumed from an older checkpoint
    may write a step whose folder a crashed attempt left)."""
    if not final.exists():
        staging.rename(final)
        return
    old = final.with_name(f".{final.name}.old{STAGING_SUFFIX}")
    shutil.rmtree(old, ignore_errors=True)
    final.rename(old)
    try:
        staging.rename(final)
    except BaseException:
        old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _complete(staging: Path, final: Path, step: int, epoch: Any, expected: Iterable[str]) -> None:
    """Rank 0, once every process has written: check, fsync, checksum every file, marker, rename."""
    missing = [n for n in expected if not (staging / n).is_file()]
    if missing:
        raise ConfigError(f"checkpoint {final.name}: {', '.join(missing)} not found in {staging} after every process "
                          "wrote its part: with several nodes the output dir must be on a filesystem all of them "
                          "share (--output-dir)")
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    for p in files:
        _fsync(p)
    marker = {"step": step, "epoch": epoch,
              "files": {p.relative_to(staging).as_posix(): _sha256(p) for p in files}}
    with (staging / MARKER).open("w") as f:
        f.write(json.dumps(marker, indent=1))
        f.flush()
        os.fsync(f.fileno())
    _fsync(staging)
    _rename_into_place(staging, final)
    _fsync(final.parent)


def save_checkpoint(ckpt_root: str | Path, step: int, state: dict[str, Any] | None, keep: int = 2, *,
                    write: Callable[[Path], None] | None = None, rank: int = 0, expected: Iterable[str] = (),
                    any_failed: Callable[[bool], bool] | None = None) -> Path:
    """Checkpoint `step`, atomically; every process of the run calls it. Rank 0 prepares the staging folder; each
    process runs `write(folder)` (the loop: `Accelerator.save_state` and its own per-process file), rank 0 also
    writes `state` as `loop_state.pt`; rank 0 then checks the `expected` files are there, fsyncs, writes the marker
    with every file's sha256, renames the folder to `step-XXXXXXXX` and prunes complete checkpoints beyond `keep`.
    `any_failed(failed)` is the barrier between those phases: True on every process when any process failed (one
    process: the flag itself). A crash or a full disk at any point leaves the previous checkpoints untouched, and
    a failed write leaves no staging folder."""
    root = Path(ckpt_root)
    final, staging = root / f"step-{step:08d}", staging_dir(root, step)
    agree = any_failed or (lambda failed: failed)

    def phase(work: Callable[[], None]) -> None:
        err: BaseException | None = None
        try:
            work()
        except Exception as e:  # noqa: BLE001 - reported to every process, then raised
            err = e
        if agree(err is not None):
            if rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
            failure = _write_failure(err, final)
            if failure is err:
                raise failure
            raise failure from err

    def prepare() -> None:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(f".step-*{STAGING_SUFFIX}"):  # left by a crashed run (one writer per run dir)
                shutil.rmtree(stale, ignore_errors=True)
            staging.mkdir()

    def write_all() -> None:
        if write is not None:
            write(staging)
        if rank == 0 and state is not None:
            write_state_file(staging / LOOP_STATE, state)

    phase(prepare)
    phase(write_all)
    phase(lambda: _complete(staging, final, step, (state or {}).get("epoch"), expected) if rank == 0 else None)
    if rank == 0:
        complete = sorted(p for p in root.glob("step-*") if (p / MARKER).exists())
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# --- reading -------------------------------------------------------------------------------------------------


def is_single_file(path: Path) -> bool:
    """A checkpoint of the format before save_state: everything in `state.pt`."""
    return (Path(path) / STATE).is_file()


def verify_checkpoint(path: Path) -> None:
    """Raises unless the marker is there and every file it lists is there with its checksum."""
    marker = json.loads((path / MARKER).read_text())
    if "files" not in marker:  # the single-file format: one checksum
        if _sha256(path / STATE) != marker["sha256"]:
            raise ValueError(f"{STATE}: checksum mismatch")
        return
    if LOOP_STATE not in marker["files"]:
        raise ValueError(f"the marker lists no {LOOP_STATE}")
    for name, digest in marker["files"].items():
        f = path / name
        if not f.is_file():
            raise ValueError(f"{name} is missing")
        if _sha256(f) != digest:
            raise ValueError(f"{name}: checksum mismatch")


def read_checkpoint(path: Path) -> dict:
    """The project's state of a checkpoint (`loop_state.pt`; the single-file format: all of `state.pt`)."""
    return safe_load(path / (STATE if is_single_file(path) else LOOP_STATE))


def read_rank_state(path: Path, rank: int) -> dict | None:
    """This process's collator and loader generators (None: no such file)."""
    f = Path(path) / rank_file(rank)
    return safe_load(f) if f.is_file() else None


def load_latest_checkpoint(ckpt_root: str | Path) -> tuple[Path, dict] | None:
    """Newest checkpoint whose marker matches every file and whose state loads; corrupt, incomplete or unsafe ones
    are skipped with a warning."""
    root = Path(ckpt_root)
    if not root.exists():
        return None
    for cand in sorted(root.glob("step-*"), reverse=True):
        try:
            verify_checkpoint(cand)
            return cand, read_checkpoint(cand)
        except Exception as e:  # truncated, missing marker or file, corrupt pickle...
            log.warning("skipping incomplete or corrupt checkpoint %s: %s", cand, e)
    return None


def _gist(e: BaseException) -> str:
    """The line of an error that says what went wrong (torch's weights_only refusal names the global on a later
    line), without terminal escapes."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln.split(" was not an allowed global")[0] for ln in lines if "Unsupported global" in ln]
    return ((named or lines or [""])[0])[:240]


def rng_file_problem(path: Path, rank: int) -> str | None:
    """Why `load_state` would not restore process `rank`'s RNG from checkpoint `path` (it would say so only at info
    level and go on): the file is missing, does not load the way accelerate loads it (weights_only, numpy's arrays
    allowed: e.g. written under another numpy), or lacks a state. None: it loads."""
    from accelerate.utils import load

    f = Path(path) / rng_file(rank)
    if not f.is_file():
        return f"{f.name} is missing"
    try:
        st = load(f, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - what load_state would swallow
        return f"{f.name} does not load ({type(e).__name__}: {_gist(e)})"
    lacking = {"random_state", "numpy_random_seed", "torch_manual_seed"} - set(st)
    return f"{f.name} lacks {', '.join(sorted(lacking))}" if lacking else None
