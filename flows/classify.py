"""Classification fine-tuning flow (`classify-finetune`): the training flow of the `classify` recipe
(tasks/jobs/classify.py). Deployments and scripts use `flows/classify.py:classify_flow`."""
from flows.config import ClassifyConfig  # noqa: F401  (the flow's parameter type, for `from flows.classify import ...`)
from flows.train import flow_for

classify_flow = flow_for("classify")
