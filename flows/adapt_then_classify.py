"""Domain adaptation, then classification, as one flow run (`adapt-then-classify`): the mlm job on the domain's
texts, then `classify` from the mlm version it registered (`models:/<mlm model>/<version>`), as two subflows of
one flow run (both show in the Prefect UI under it). When the mlm version does not beat its quality floor (the
model before fine-tuning, epoch 0) or failed its checks, classification starts from `classify.train.model` (the
pretrained checkpoint) instead, and the summary says so. The two MLflow runs are linked both ways: the classify
run's `finetune.upstream_run_id` (and, when it started from the version, the `base.*` params, tags and model
input), the mlm run's `finetune.downstream_run_id` (and `finetune.derived_run_ids`)."""
from __future__ import annotations

import math

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from flows import train
from flows.config import ClassifyConfig, MLMConfig
from tasks import tracking
from tasks.common import run_logger
from tasks.promotion import higher_is_better

NAME = "adapt-then-classify"


class AdaptThenClassifyConfig(BaseModel):
    """The two jobs' configs (each exactly as `finetune mlm` / `finetune classify` take it; both default to the
    bundled MiniLM on the bundled reviews). `classify.train.model` is the fallback (the pretrained checkpoint) when
    the adapted version is not better than its floor; the classify step otherwise trains from that version."""

    model_config = ConfigDict(extra="forbid")

    mlm: MLMConfig = Field(default_factory=MLMConfig, description="The domain-adaptation step (mlm job).")
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig, description="The classification step.")
    require_floor: bool = Field(
        True, description="Classify from the mlm version only when it beat its quality floor (perplexity below the "
        "model before fine-tuning); false: from the version whatever its promotion said.")


def adapted_base(mlm_out: dict, require_floor: bool = True) -> tuple[str | None, str]:
    """(`models:/NAME/VERSION` of the mlm run's version, or None to fall back) and why, from the mlm run's
    outcome. A version is used when its checks passed and it beat its floor (the model before fine-tuning) by
    the promotion metric; with promotion off the floor was never checked: it is used, and the reason says so."""
    version, uri = mlm_out.get("version"), mlm_out.get("model_uri")
    if not version or not uri:
        return None, "the mlm run registered no version"
    p = mlm_out.get("promotion") or {}
    if not p:
        return uri, f"mlm version {version} (promotion off: its floor was not checked)"
    if p.get("challenger_error"):
        return None, f"mlm version {version} failed its checks ({p['challenger_error']})"
    metric, score, floor = p.get("metric"), p.get("challenger_score"), p.get("baseline_score")
    if floor is None or score is None or not require_floor:
        return uri, f"mlm version {version} ({'floor not required' if not require_floor else 'no floor to beat'})"
    up = higher_is_better("mlm", metric)
    beats = math.isfinite(score) and (score > floor if up else score < floor)
    if not beats:
        return None, (f"mlm version {version} did not beat its floor ({metric} {score:.4g} vs {floor:.4g} before "
                      "fine-tuning)")
    return uri, f"mlm version {version} beat its floor ({metric} {score:.4g} vs {floor:.4g} before fine-tuning)"


def classify_config_from(cfg: AdaptThenClassifyConfig, base_uri: str | None) -> ClassifyConfig:
    """The classify step's config: its own, trained from the mlm version when there is one."""
    if base_uri is None:
        return cfg.classify
    return cfg.classify.model_copy(update={"train": cfg.classify.train.model_copy(update={"model": base_uri})})


def summary(mlm_out: dict, cls_out: dict, base_uri: str | None, why: str, fallback_model: str) -> str:
    lines = [f"== {NAME} finished ==",
             f"  mlm run {mlm_out['run_id']}: version {mlm_out.get('version')} ({mlm_out.get('decision') or ''})",
             f"  classify started from  {base_uri if base_uri else fallback_model + ' (the pretrained checkpoint)'}",
             f"    because              {why}",
             f"  classify run {cls_out['run_id']}: version {cls_out.get('version')} ({cls_out.get('decision') or ''})"]
    for k in ("eval_accuracy", "eval_f1"):
        if isinstance(cls_out.get("metrics", {}).get(k), float):
            lines.append(f"  classify {k:<13} {cls_out['metrics'][k]:.4f}")
    return "\n".join(lines)


def _link(mlm_run: str, cls_run: str, base_uri: str | None) -> None:
    """Both ways, as tags (the lineage params come from the classify run's own start when it used the version)."""
    from prefect.runtime import flow_run

    tags = {"finetune.pipeline": NAME, "finetune.pipeline_flow_run_id": str(flow_run.id or "")}
    tracking.set_tags(mlm_run, {**tags, "finetune.downstream_run_id": cls_run})
    tracking.set_tags(cls_run, {**tags, "finetune.upstream_run_id": mlm_run,
                                "finetune.adapted_base": "true" if base_uri else "false"})


@flow(name=NAME, description="Domain-adaptive pretraining (mlm) then classification from the adapted version.")
def adapt_then_classify_flow(config: AdaptThenClassifyConfig = AdaptThenClassifyConfig()) -> dict:
    """mlm subflow -> the version it registered (if it beat its floor) -> classify subflow from it."""
    logger = run_logger(__name__)
    mlm_out = train.flow_for("mlm")(config.mlm)
    base_uri, why = adapted_base(mlm_out, config.require_floor)
    logger.info("classification starts from %s: %s", base_uri or config.classify.train.model, why)
    cls_out = train.flow_for("classify")(classify_config_from(config, base_uri))
    _link(mlm_out["run_id"], cls_out["run_id"], base_uri)
    text = summary(mlm_out, cls_out, base_uri, why, config.classify.train.model)
    print(text)
    return {"mlm": mlm_out, "classify": cls_out, "classify_base": base_uri or config.classify.train.model,
            "adapted": base_uri is not None, "reason": why, "summary": text}


def precheck(cfg: AdaptThenClassifyConfig) -> None:
    """Both steps' checks before Prefect starts (the classify step against its fallback checkpoint: the mlm
    version does not exist yet)."""
    train.precheck(cfg.mlm)
    train.precheck(cfg.classify)
