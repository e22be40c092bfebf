"""Champion/challenger promotion in a flow: the gate itself (the rule, scoring, the quality floor, the score cache)
is `tasks.promotion`; this module gives it a job config's view, rebuilds a version's eval data when the caller has
none, and publishes the outcome as a Prefect artifact."""
from __future__ import annotations

from flows import monitoring
from flows.config import JobConfig, config_from_params
from tasks import promotion, registry, tracking
from tasks.data import prepare_dataset


def eval_data_for_version(name: str, version: str) -> tuple[JobConfig, str, str]:
    """Rebuilds (from the content-addressed cache, or afresh) the prepared and tokenized data of the run that
    produced `version`, from its logged params: the eval split the challenger was measured on."""
    mv = registry.get_version(name, version)
    if mv is None or not mv.run_id:
        raise LookupError(f"{name} version {version} has no source run to take the eval data from")
    cfg = config_from_params(tracking.client().get_run(mv.run_id).data.params)
    data = prepare_dataset(cfg.data, cfg.train.seed, getattr(cfg, "num_labels", None), getattr(cfg, "problem", None))
    spec = cfg.spec(data.label_names)
    return cfg, data.path, cfg.recipe.tokenize(data.path, cfg.train.model, spec)


def champion_challenger(cfg: JobConfig, name: str, version: str, data_path: str | None = None,
                        tokenized_path: str | None = None, run_final: dict | None = None,
                        run_history: list[dict] | None = None, probe: dict[str, float] | None = None,
                        promote: bool = True) -> dict:
    """`tasks.promotion.champion_challenger` for `cfg` (its promotion metric and margin), on the run's data or, when
    not given, the data the challenger's run trained on; the outcome also as a Prefect artifact."""
    result = promotion.champion_challenger(
        cfg.spec(), name, version, margin=cfg.tracking.promotion_margin, promote=promote, data_path=data_path,
        tokenized_path=tokenized_path, eval_data=lambda: eval_data_for_version(name, str(version))[1:],
        run_final=run_final, run_history=run_history, probe=probe)
    if "challenger_version" in result:  # a comparison happened (not: the version already is the champion)
        monitoring.promotion_artifact(name, result)
    return result
