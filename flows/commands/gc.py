"""`finetune gc`: free the disk that finished, failed and orphaned runs, stale caches and old versions hold
(flows/gc.py; the plan and its application are tasks/disk.py)."""
from __future__ import annotations

from typing import Any

import click

from flows.commands import command
from flows.gc import gc_cli


def _gc(**kwargs: Any) -> int:
    return gc_cli(**kwargs)


def commands() -> list[click.Command]:
    return [command(
        "gc", "Free disk: what finished, failed and orphaned runs left, stale caches and runs, old model versions.",
        "finetune gc --keep-versions 5 --yes",
        [click.Option(["--output-dir", "output_dirs"], multiple=True, metavar="DIR",
                      help="Training output dir to clean (repeatable; default: outputs/ of this checkout)."),
         click.Option(["--cache-dir", "cache_dir"], metavar="DIR",
                      help="Prepared-dataset cache (default: FINETUNE_CACHE_DIR or .cache/)."),
         click.Option(["--cache-days", "cache_days"], type=float, default=30.0, show_default=True, metavar="DAYS",
                      help="Remove cache entries unused for this long (they are rebuilt when needed)."),
         click.Option(["--keep-versions", "keep_versions"], type=int, default=10, show_default=True, metavar="N",
                      help="Per registered model, keep the newest N versions; older ones without an alias are "
                           "deleted with their logged model. Versions with an alias are always kept."),
         click.Option(["--registered-model", "registered_models"], multiple=True, metavar="NAME",
                      help="Limit version retention to this model (repeatable; default: every model finetune "
                           "registered)."),
         click.Option(["--grace-days", "grace_days"], type=float, default=None, metavar="DAYS",
                      help="A run dir whose run this store does not hold is touched only when its own record "
                           "(run.json) says its process is dead and was last seen this long ago (default 7, "
                           "FINETUNE_GC_GRACE_DAYS)."),
         click.Option(["--yes", "yes"], is_flag=True, default=False,
                      help="Apply. Without it gc only prints what it would do (a dry run).")],
        _gc,
    )]
