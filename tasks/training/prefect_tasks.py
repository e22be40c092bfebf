"""The Prefect task wrappers of the training step, for the flows only (the ranks never import Prefect)."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common import ConfigError
from tasks.training.config import StopTraining
from tasks.training.core import train
from tasks.training.prepare import build_loaders

build_loaders_task = task(build_loaders, name="build-dataloaders", cache_policy=NO_CACHE, persist_result=False)


def retry_unless_config_error(task, task_run, state) -> bool:
    """Retry crashes and I/O trouble (the retry resumes from the last checkpoint), not bad input nor a run stopped
    on purpose (a pruned trial)."""
    return not isinstance(state.result(raise_on_failure=False), (ConfigError, StopTraining))


# One retry: it resumes from the last complete checkpoint (see resume_on_retry), so a transient failure late in
# training costs one epoch at most.
train_task = task(
    train, name="train", cache_policy=NO_CACHE, persist_result=False,
    retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_config_error,
)
