"""Masked-LM fine-tuning flow (`mlm-finetune`): the training flow of the `mlm` recipe (tasks/jobs/mlm.py), TRL's
SFTTrainer with the masked-LM objective or the plain loop. Deployments use `flows/mlm.py:mlm_flow`."""
from flows.config import MLMConfig  # noqa: F401
from flows.train import flow_for
from tasks.jobs.mlm import EXAMPLE  # noqa: F401

mlm_flow = flow_for("mlm")
