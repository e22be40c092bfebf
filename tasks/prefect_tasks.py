"""The Prefect task wrappers of the plain functions in tasks/ (load the data, tokenize, log a model dir: full or LoRA, `tasks.adapters.log_model`), for the
flows only. The modules they wrap (tasks/data.py, tasks/tokenize.py, tasks/tracking.py) import no Prefect, so
the training ranks (`python -m tasks.distributed`, which read data and log metrics through them) never load it;
the training step's own wrappers are in tasks/training/prefect_tasks.py."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common import ConfigError, prepared_cache_policy
from tasks.data import prepare_dataset
from tasks.tokenize import tokenize_job
from tasks.adapters import log_model

load_dataset_task = task(
    prepare_dataset,
    name="load-dataset",
    cache_policy=prepared_cache_policy(),
    persist_result=True,
    retries=2,
    retry_delay_seconds=[5, 30],
    # Only I/O is retried; a ConfigError will not get better by itself.
    retry_condition_fn=lambda t, tr, state: not isinstance(state.result(raise_on_failure=False), ConfigError),
)

tokenize_job_task = task(tokenize_job, name="tokenize", cache_policy=prepared_cache_policy(), persist_result=True)

log_model_task = task(log_model, name="log-model", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10)
