"""A third job, added the way a user would: this module alone. A 3-class topic classifier (sports, food, tech)
with its own options, metric set and promotion rule; it reuses the classification building blocks it shares."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.jobs import JobSpec, Promotion, Recipe, classify, register

TOPICS = {
    "sports": ["the team won the match", "a great goal in the final", "the striker scored twice", "fans cheered the win"],
    "food": ["the soup was hot and tasty", "fresh bread and butter", "a sweet cake for dessert", "spicy noodles for lunch"],
    "tech": ["the new phone has a fast chip", "install the software update", "the laptop battery lasts long",
             "a bug in the code"],
}


class TopicOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: Literal["manual", "trainer"] = Field("manual", description="manual: plain loop; trainer: HF Trainer.")
    num_labels: int | None = Field(3, gt=1, description="Number of topics.")


def evaluate(model, loader, device, dtype=None, desc: str = "eval") -> dict:
    """Classification metrics plus the share of topics the model ever predicts (a collapse detector)."""
    r = classify.evaluate(model, loader, device, dtype, desc)
    r["eval_topic_coverage"] = len(set(r["preds"])) / model.config.num_labels
    return r


def check_prediction(out: list) -> str | None:
    return None if out and out[0]["label"] in TOPICS else f"not a topic: {out!r}"


RECIPE = register(Recipe(
    name="topics",
    description="Toy third job: a 3-class topic classifier (sports, food, tech).",
    example="finetune topics --dataset topics.csv --epochs 3",
    options=TopicOptions,
    registered_model="toy-topics",
    hf_task="text-classification",
    metrics=("eval_loss", "eval_accuracy", "eval_f1", "eval_topic_coverage"),
    promotion=Promotion("accuracy", {"accuracy": ("eval_accuracy", True), "coverage": ("eval_topic_coverage", True)}),
    smoke_example="the goalkeeper saved a penalty",
    tokenize=classify.tokenize,
    load_model=classify.load_model,
    collator=classify.collator,
    evaluate=evaluate,
    trainer_class=classify.trainer_class,
    trainer_args=classify.trainer_args,
    predict=classify.predict_classification,
    check_prediction=check_prediction,
    run_tags=classify.run_tags,
    artifacts=classify.artifacts,
    align_eval=classify.align_eval,
    baseline=classify.baseline,  # the majority-class floor (accuracy); coverage has none
    baseline_name="majority-class",
    data_defaults={"text_column": "text", "label_column": "topic"},
    learning_rate=1e-2,
))
