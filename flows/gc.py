"""`finetune gc`: what finished, failed and orphaned runs left behind, stale caches, stale RUNNING runs, old
unaliased model versions and the logged models of finished runs that were never registered; a dry run unless
`--yes`. The plan and its application are `tasks.disk`."""
from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks import disk, tracking
from tasks.common import PROJECT_ROOT, ConfigError, cache_root


def gc_cli(output_dirs: tuple[str, ...], cache_dir: str | None, cache_days: float, keep_versions: int | None,
           registered_models: tuple[str, ...], yes: bool, grace_days: float | None = None) -> int:
    if keep_versions is not None and keep_versions < 1:
        raise ConfigError(f"--keep-versions {keep_versions}: keep at least 1 (aliased versions are always kept)")
    if grace_days is not None and grace_days < 0:
        raise ConfigError(f"--grace-days {grace_days}: give 0 or more days")
    tracking.check_remote()
    outs = [Path(p) for p in output_dirs] or [PROJECT_ROOT / "outputs"]
    items = disk.collect(outs, Path(cache_dir) if cache_dir else cache_root(), cache_days,
                         list(registered_models) or None, keep_versions, grace_days)
    verb = "removed" if yes else "would remove"
    labels = {"stale-run": "marked KILLED" if yes else "would mark KILLED", "version": f"{verb} (deleted)",
              "model": f"{verb} (deleted)", "kept": "left alone"}
    if yes:
        results = disk.apply(items)
    else:
        results = [(it, None) for it in items]
    freed = 0
    for it, err in results:
        action = labels.get(it.kind, verb)
        size = f" ({disk.human_bytes(it.bytes)})" if it.bytes else ""
        print(f"{action:<17} {it.kind:<9} {it.what}{size}: {it.reason}" + (f"  FAILED: {err}" if err else ""))
        freed += 0 if err else it.bytes
    counts = {k: sum(1 for it, e in results if it.kind == k and not e)
              for k in ("run-files", "run-dir", "cache", "version", "model", "stale-run", "kept")}
    summary = (f"{counts['run-files']} finished run(s) trimmed, {counts['run-dir']} run dir(s), {counts['cache']} "
               f"cache entr{'y' if counts['cache'] == 1 else 'ies'}, {counts['version']} model version(s), "
               f"{counts['model']} never-registered logged model(s), {counts['stale-run']} stale run(s)")
    if counts["kept"]:
        summary += f"; {counts['kept']} run dir(s) left alone (not provably finished runs of this store)"
    if yes:
        print(f"gc: freed {disk.human_bytes(freed)}: {summary}")
    else:
        print(f"gc (dry run): would free {disk.human_bytes(freed)}: {summary}. Run again with --yes to apply.")
    return 1 if any(e for _, e in results) else 0


@flow(name="housekeeping", log_prints=True)
def housekeeping_flow(keep_versions: int = 10, cache_days: float = 30.0, output_dirs: list[str] | None = None) -> int:
    """`finetune gc --yes` on a schedule (deployments/prefect.yaml runs it nightly after the retraining): what the
    retraining leaves behind never accumulates, and each model keeps its newest `keep_versions` versions plus every
    aliased one. Its report is the flow run's log."""
    rc = gc_cli(tuple(output_dirs or ()), None, cache_days, keep_versions, (), True)
    if rc:
        raise RuntimeError("some gc items failed: see the log above")
    return rc
