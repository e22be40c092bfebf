"""The one training flow, driven by a job recipe: check -> load -> tokenize -> loaders -> train -> log -> publish.
`flow_for(job)` builds the Prefect flow of a registered job (its parameter is the job's typed config, so Prefect
validates it and renders it as a form); `flows/classify.py` and `flows/mlm.py` are two such flows."""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
from pathlib import Path

from mlflow.entities import LoggedModelInput
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows import lifecycle
from flows.common import flow_run_name_for, mlflow_run, run_dir_for, sigterm_as_exception, summary_text
from flows.config import JobConfig, config_class
from flows.ephemeral import own_temporary_server
from flows.monitoring import summary_artifact
from tasks import jobs, output, registry, tracking
from tasks.base_model import check_fits, check_labels, check_lora, is_registry_uri, local_dir, pin, trained_labels
from tasks.common import cached_path_result, is_hub_id, offline_unless_hub_reachable, run_logger
from tasks.data import FILE_BUILDERS, check_data, prepare_dataset
from tasks.liveness import sweep_quietly
from tasks.prefect_tasks import load_dataset_task, tokenize_job_task
from tasks.tokenize import check_model
from tasks.training import build_loaders_task


def selection_note(result, select: str) -> str:
    """One line for the summary: `2 of 4 (best by eval_f1; stopped early after epoch 4)`."""
    trained = max((r["epoch"] for r in result.history), default=0)
    if select == "best" and result.selected_epoch == result.best_epoch:
        note = f"{result.selected_epoch} of {trained} (best by {result.selection_metric}"
    else:
        note = f"{result.selected_epoch} of {trained} (the last; best by {result.selection_metric}: {result.best_epoch}"
    if result.stopped_early_at:
        note += f"; stopped early after epoch {result.stopped_early_at}"
    return note + ")"


def starting_point(cfg: JobConfig) -> tuple:
    """Where the run's weights start: `train.model`, or a registered version (`train.model: models:/NAME@ALIAS`
    or `warm_start`, which names the job's own registered model). A registry alias is resolved to its version HERE,
    once: the returned config trains from `models:/NAME/VERSION` (downloaded to the cache now, fit for the job's
    task checked), so an alias moved during the run changes nothing. Returns (config, lineage or None, a note for
    the log and the summary; the lineage is a `tasks.base_model.BaseRef`)."""
    note = None
    uri = cfg.train.model
    if cfg.warm_start:
        ws = cfg.warm_start
        uri = f"models:/{cfg.registered_model}/{ws}" if ws.isdigit() else f"models:/{cfg.registered_model}@{ws}"
        if not ws.isdigit() and registry.alias_version(cfg.registered_model, ws) is None:
            note = (f"warm start: {cfg.registered_model} has no {ws} yet, so training starts from "
                    f"{cfg.train.model}")
            return cfg, None, note
    if not is_registry_uri(uri):
        return cfg, None, None
    ref = pin(uri)
    path = local_dir(ref.uri, ref)
    check_fits(path, cfg.recipe.hf_task, uri)
    note = (f"warm start from {ref.uri}" if cfg.warm_start else f"base {ref.uri}") + \
        (f" (resolved from {ref.requested})" if ref.requested != ref.uri else "") + f", run {ref.run_id}"
    pinned = cfg.model_copy(update={"train": cfg.train.model_copy(update={"model": ref.uri})})
    return pinned, ref, note


def record_lineage(run_id: str, ref, warm_start: str | None) -> None:
    """Params, tags and MLflow's model-lineage input of a run that starts from a registered version, and the reverse
    link on the base's run (`finetune.derived_run_ids`). Which weights the job's model did not take from the version
    comes after training (`record_new_weights`)."""
    tracking.log_params_once(run_id, ref.params())
    tracking.set_tags(run_id, {**ref.tags(), **({"finetune.warm_start": warm_start} if warm_start else {})})
    c = tracking.client()
    if ref.model_id:
        try:
            with tracking.on_run(run_id):
                tracking._retry(c.log_inputs, run_id, models=[LoggedModelInput(ref.model_id)], attempts=2)
        except Exception as e:  # a server without model inputs (MLflow 2): the params and tags above still link
            run_logger(__name__).warning("could not record %s as the run's model input (%s): the base.* params and "
                                         "tags record the lineage", ref.model_id, tracking.redact_uri(e))
    if ref.run_id:
        with contextlib.suppress(Exception):  # the base run may live where this identity cannot write: best effort
            old = c.get_run(ref.run_id).data.tags.get("finetune.derived_run_ids", "")
            ids = [x for x in old.split(",") if x] + [run_id]
            tracking.set_tags(ref.run_id, {"finetune.derived_run_ids": ",".join(dict.fromkeys(ids))[-5000:]})


def record_new_weights(run_id: str, result) -> list[str]:
    """The `base.new_weights` param: the weights the job's model did not take from the base version (transformers'
    loading info, as training recorded it when it loaded the model: a new head). Returns those names."""
    tracking.log_params_once(run_id, {"base.new_weights": (",".join(result.new_weights) or "none")[:5000]})
    return list(result.new_weights)


def precheck(cfg: JobConfig) -> None:
    """The checks that need no Prefect, for the CLI (and deployments/trigger.py) to run before Prefect starts:
    the promotion metric, the model (loadable, max_length within its limit, fit for the job; a registered version
    as the base: resolved and downloaded, and a classifier version's labels against the data's, which prepares the
    data) and the data (file, columns, splits, labels). A few seconds; a problem is one ConfigError. The flow runs
    the same checks again, for runs that come from a deployment."""
    jobs.resolve_metric(cfg.job, cfg.tracking.promotion_metric, cfg.spec().options)
    cfg, base, _ = starting_point(cfg)  # a registry base: resolved, downloaded (cached), fit for the job
    dataset = cfg.data.dataset
    if is_hub_id(cfg.train.model) or (is_hub_id(dataset) and Path(dataset).suffix.lower() not in FILE_BUILDERS):
        offline_unless_hub_reachable()  # one connection attempt, not minutes of retries
    quiet = logging.getLogger("tasks")  # the model check's warnings come again from the flow run: once is enough
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        (cfg.recipe.check_model or check_model)(cfg.train.model, cfg.data.max_length)
    finally:
        quiet.setLevel(level)
    if cfg.peft == "lora":  # targets peft can resolve for this architecture (else get_peft_model fails after data work)
        check_lora(cfg.train.model, cfg.lora.target_modules, cfg.recipe.hf_task)
    check_data(cfg.data, getattr(cfg, "num_labels", None), getattr(cfg, "problem", None))
    if base is not None and cfg.recipe.needs_labels:
        path = local_dir(base.uri, base)
        if trained_labels(path) is not None:  # a classifier version (warm start): its labels against the data's
            # the flow's load reuses the prepared (cached) data
            names = prepare_dataset(cfg.data, cfg.train.seed, getattr(cfg, "num_labels", None),
                                    getattr(cfg, "problem", None)).label_names
            check_labels(path, names, base.requested)
    if cfg.recipe.precheck:  # the job's option checks that need the data (classify: class-weights labels)
        cfg.recipe.precheck(cfg.spec())


def run_training(cfg: JobConfig) -> dict:
    """The body of every training flow (plain function: the flow wrapper only names and validates the run)."""
    output.configure()  # a worker's flow run starts here: no bars in its log, no unactionable notices
    recipe = cfg.recipe
    logger = run_logger(__name__)
    # --- cheap checks first: tracking store reachable, model loadable and fit for the job, promotion metric known
    uri = tracking.redact_uri(tracking.check_tracking_server())  # shown and returned: credentials redacted
    # a registered version as the base: the alias is resolved once, here; from now on the run uses the version
    cfg, base, base_note = task(starting_point, name="resolve-base", cache_policy=NO_CACHE)(cfg)
    if base_note:
        logger.info("%s", base_note)
    check = task(recipe.check_model or check_model, name="check-model", cache_policy=NO_CACHE)
    info = check(cfg.train.model, cfg.data.max_length)
    jobs.resolve_metric(cfg.job, cfg.tracking.promotion_metric, cfg.spec().options)
    # --- data: load (validated, split, cached by content), tokenize the job's way
    num_labels = getattr(cfg, "num_labels", None)
    data = cached_path_result(load_dataset_task, cfg.data, cfg.train.seed, num_labels, getattr(cfg, "problem", None),
                              path_of=lambda d: d.path)
    logger.info("data: %d train / %d eval examples%s", data.num_train, data.num_eval,
                f", labels {data.label_names}" if data.label_names else "")
    spec = cfg.spec(data.label_names)
    if recipe.resolve_spec:  # data-dependent options (classify: class weights from the train split's counts)
        spec = recipe.resolve_spec(spec, data.path)
    if base is not None and recipe.needs_labels:  # a classifier version keeps its head only for the same labels
        check_labels(local_dir(base.uri, base), data.label_names, base.requested)
    tokenized = cached_path_result(tokenize_job_task, data.path, cfg.train.model, spec)
    stats = recipe.data_stats(tokenized) if recipe.data_stats else {}
    if stats:
        logger.info("tokenized: %s", ", ".join(f"{k} {v}" for k, v in stats.items()))

    # --- the run: train -> log -> retention -> publish (flows/lifecycle.py, the path a sweep trial takes too)
    with sigterm_as_exception(), mlflow_run(cfg) as run_id:
        run_dir = run_dir_for(cfg, run_id)
        tracking.log_params_once(run_id, {f"data.{k}": v for k, v in stats.items()})
        if recipe.run_tags:
            tracking.set_tags(run_id, recipe.run_tags(info or {}, data))
        if base is not None:
            record_lineage(run_id, base, cfg.warm_start)
        done = lifecycle.train_log_publish(cfg, spec, run_id, run_dir, tokenized, data.path,
                                           loaders=build_loaders_task(tokenized, spec))
        result, outcome = done.result, done.outcome
        new_weights = record_new_weights(run_id, result) if base is not None else None
    metrics = {k: v for k, v in result.final.items() if k != "epoch"}
    if result.history and result.history[0].get("epoch") == 0:
        metrics.update({f"epoch0_{k}": v for k, v in result.history[0].items() if k != "epoch"})
    summary_artifact(cfg.job, cfg.registered_model, run_id, metrics, outcome, uri)
    print(summary_text(cfg.job, metrics, run_id, cfg.registered_model, outcome.get("version"),
                       outcome.get("aliases", []), outcome["predict_cmd"], outcome.get("decision")))
    print(f"  registered epoch       {selection_note(result, cfg.train.select)}")
    if base_note:
        print(f"  started from           {base_note}")
    if done.text:
        print(done.text)
    return {"run_id": run_id, "tracking_uri": uri, "metrics": metrics, **outcome, "history": result.history,
            "model_dir": done.model_dir, "selected_epoch": result.selected_epoch, "best_epoch": result.best_epoch,
            "stopped_early_at": result.stopped_early_at,
            "device": result.device, "train_samples_per_second": result.train_samples_per_second,
            "trainable_parameters": result.trainable_parameters, "total_parameters": result.total_parameters,
            "probe": result.probe, "base": (base.params() if base is not None else None),
            "base_note": base_note, "base_new_weights": new_weights}


@functools.lru_cache(maxsize=None)
def flow_for(job: str):
    """The Prefect flow of a registered job, named `<job>-finetune`, with its typed config as the parameter: the
    `<job>_flow` of a module `flows/<job>.py` when there is one (a stable deployment entrypoint, as for classify and
    mlm), else one generated here. A generated flow is also an attribute of this module (`flows/train.py:<job>_flow`,
    see `__getattr__`), so a worker that registers the same job can load its deployments by entrypoint."""
    if importlib.util.find_spec(f"flows.{job}") is not None:
        own = getattr(importlib.import_module(f"flows.{job}"), f"{job}_flow", None)
        if own is not None:
            return own
    cls = config_class(job)

    def body(config: JobConfig = cls()) -> dict:
        return run_training(config)

    body.__annotations__ = {"config": cls, "return": dict}
    body.__doc__ = cls.description
    body.__name__ = body.__qualname__ = f"{job}_flow"
    return flow(name=f"{job}-finetune", flow_run_name=flow_run_name_for(cls), description=cls.description)(body)


def __getattr__(name: str):
    """`flows.train.<job>_flow` for any registered job (PEP 562), the entrypoint of a generated flow."""
    if name.endswith("_flow"):
        if name[: -len("_flow")] in jobs.all_jobs():
            return flow_for(name[: -len("_flow")])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_job(cfg: JobConfig) -> dict:
    """Runs the training flow of `cfg`'s job and returns its result dict (the CLI's entry). First the housekeeping a
    crash of an earlier command needs: its MLflow runs of this experiment whose process died are marked KILLED, and
    Prefect's temporary server (no PREFECT_API_URL) is started tied to this process, so a kill -9 leaves no orphan."""
    sweep_quietly([cfg.experiment])
    own_temporary_server()
    return flow_for(cfg.job)(cfg)
