"""Masked-LM fine-tuning flow (`mlm-finetune`): the training flow of the `mlm` recipe (tasks/jobs/mlm.py), TRL's
SFTTrainer with the masked-LM objective or the plain loop. Defined here, not generated, so deployments have a
stable entrypoint: `flows/mlm.py:mlm_flow`."""
from prefect import flow

from flows.common import flow_run_name_for
from flows.config import MLMConfig
from flows.train import run_training
from tasks.jobs.mlm import EXAMPLE  # noqa: F401


@flow(name="mlm-finetune", flow_run_name=flow_run_name_for(MLMConfig), description=MLMConfig.description)
def mlm_flow(config: MLMConfig = MLMConfig()) -> dict:
    """Fine-tune a masked language model, track it in MLflow and register it (fill-mask) in the Model Registry."""
    return run_training(config)
