"""Serialise registry changes per registered model, so two retraining runs of the same model cannot interleave
their promotions. Two layers: a file lock next to the local store (covers every process on this machine, also in
Prefect's ephemeral mode, where each process has its own temporary API), and, when a Prefect server is
configured (PREFECT_API_URL), a Prefect global concurrency limit of 1 named `registry:<model>` (covers workers on
other machines and shows in the UI)."""
from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from tasks import tracking

log = logging.getLogger(__name__)


def _ensure_prefect_limit(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as c:
        try:
            c.read_global_concurrency_limit_by_name(name)
        except Exception:
            try:
                c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except Exception:  # created concurrently
                pass


@contextlib.contextmanager
def registry_lock(model_name: str, timeout: float = 1800.0) -> Iterator[None]:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)
    lock_dir = Path(os.environ.get("FINETUNE_LOCK_DIR", tracking.STORE_DIR / "locks"))
    lock_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = FileLock(lock_dir / f"{safe}.lock", timeout=timeout).acquire()
    except Timeout:
        raise TimeoutError(f"waited {timeout:.0f}s for the registry lock of {model_name!r}") from None
    with lock:
        if os.environ.get("PREFECT_API_URL"):
            from prefect.concurrency.sync import concurrency

            limit = f"registry:{safe}"
            _ensure_prefect_limit(limit)
            with concurrency(limit, occupy=1, timeout_seconds=timeout, strict=True):
                yield
        else:
            yield
