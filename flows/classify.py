"""Classification fine-tuning flow (`classify-finetune`): the training flow of the `classify` recipe
(tasks/jobs/classify.py). Defined here, not generated, so deployments have a stable entrypoint:
`flows/classify.py:classify_flow`."""
from prefect import flow

from flows.common import flow_run_name_for
from flows.config import ClassifyConfig
from flows.train import run_training


@flow(name="classify-finetune", flow_run_name=flow_run_name_for(ClassifyConfig),
      description=ClassifyConfig.description)
def classify_flow(config: ClassifyConfig = ClassifyConfig()) -> dict:
    """Fine-tune a BERT-family classifier, track it in MLflow and register it in the Model Registry."""
    return run_training(config)
