"""What third-party libraries may print. A run's output is our own lines: one per epoch, the warnings a user can act
on, the summary. Progress bars stay on a terminal and go away in logs (non-TTY: a worker's log, a CI file), where
every redraw would be a line; notices nobody can act on are dropped everywhere. `FINETUNE_VERBOSE=1` (the CLI's
`--verbose`) keeps the libraries' own logging as it is.

Called at every entry point (the CLI, deployments/serve.py and trigger.py, and the training flow's body, which is
where a worker's flow run starts). Environment variables carry the settings to subprocesses (Prefect's temporary
server, torchrun workers, `prefect worker` flow runs) and to libraries not imported yet; libraries already imported
are switched through their own APIs."""
from __future__ import annotations

import logging
import os
import sys

from tasks.common import cache_root

# Log records of third-party loggers that say nothing a user can act on: (logger, message start).
_NOISE = {
    # every log_model of a local checkpoint: there is no Hub model card or licence to find for it
    "mlflow.transformers": ("The model card could not be retrieved", "Unable to find license information",
                            "'models:/"),
    "mlflow.transformers.signature": ("Running model prediction to infer the model output signature",),
    # a new local store's first use
    "mlflow.store.db.utils": ("Creating initial MLflow database tables", "Updating database tables"),
}


def verbose() -> bool:
    return os.environ.get("FINETUNE_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on")


def is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _DropNoise(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:
            return True
        return not msg.startswith(self.starts)


_configured = False


def configure() -> None:
    """Idempotent. Bars off when stderr is not a terminal; telemetry off; the unactionable notices dropped."""
    global _configured
    # Prefect's server telemetry fails offline with an ERROR on every start of a (temporary) server.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    tty = is_tty()
    if not tty:
        for var, value in (("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                           ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"), ("TQDM_DISABLE", "1")):
            os.environ.setdefault(var, value)
        _switch_imported()
    if verbose():
        return
    # transformers' load report (a table with ANSI codes: a fresh classification head is "MISSING", an MLM head
    # the classifier drops is "UNEXPECTED": both expected when fine-tuning) and its other notices: errors only.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    if not _configured:
        for name, starts in _NOISE.items():
            logging.getLogger(name).addFilter(_DropNoise(starts))
        _configured = True


def quiet_ray() -> None:
    """Ray's driver output as a redirected log wants it: no colour codes in worker-line prefixes and no coloured
    "[repeated Nx]" notes (log deduplication off). Ray reads RAY_DEDUP_LOGS when it is imported: a process that
    imported it already (a second sweep or scoring job in one process) gets the switch on the imported module too."""
    if is_tty():
        return
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if "ray" in sys.modules and os.environ["RAY_DEDUP_LOGS"] == "0":
        try:
            import ray._private.ray_logging as ray_logging

            ray_logging.RAY_DEDUP_LOGS = False
        except (ImportError, AttributeError):  # a Ray without that module: its own default stays
            pass


def _switch_imported() -> None:
    """Progress bars off in libraries imported before `configure` ran (their env variables are read at import)."""
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def progress_bars() -> bool:
    """Whether our own bars (training and evaluation loops, Trainer's) are drawn: on a terminal only."""
    return is_tty() and os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("1", "true")


# --- tracebacks of expected errors: a debug log file, not the terminal --------------------------------------------

_debug_log_started = False


def debug_log_path():
    """One file, rewritten by each command that records an error (so it never grows): <cache dir>/logs/."""
    return cache_root() / "logs" / "finetune-debug.log"


def record_traceback(text: str) -> None:
    """Appends `text` (a formatted traceback) to this command's debug log; the first write of a process starts the
    file afresh. Best effort: a read-only location loses the details, never the command's own error line."""
    global _debug_log_started
    import datetime

    try:
        path = debug_log_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a" if _debug_log_started else "w", encoding="utf-8") as f:
            f.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')} pid {os.getpid()} "
                    f"argv {' '.join(sys.argv)}\n{text.rstrip()}\n")
        _debug_log_started = True
    except OSError:
        pass


def format_exception(e: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(type(e), e, e.__traceback__))
