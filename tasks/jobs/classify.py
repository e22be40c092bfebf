"""Text classification (IMDB sentiment offline; yelp_review_full with 5 classes elsewhere): the recipe. Three kinds,
chosen by the `problem` option, each one module under tasks/kinds/ that this recipe hands its hooks to:
  single_label  (default, as always) one class per text: eval_loss, eval_accuracy, eval_f1 (macro); promotion on
                macro-F1, which equals accuracy on balanced data (IMDB) and does not reward predicting the majority
                class on skewed data; floor: the majority class
  multi_label   a set of labels per text (a list column, or --label-separator): eval_f1 (macro over labels),
                eval_micro_f1, eval_subset_accuracy; --threshold; floor: the majority label set
  regression    a number per text: eval_rmse (promotion, lower is better), eval_mae, eval_pearson, eval_spearman;
                floor: predicting the mean
Any kind takes sentence pairs (`--text-pair-column`); single- and multi-label take `--class-weights`.
Engines: `manual` (the core's plain loop) and `trainer` (transformers.Trainer)."""
from __future__ import annotations

import functools
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from tasks import kinds
from tasks.data import prepare_dataset
from tasks.jobs import JobSpec, Promotion, Recipe, register
from tasks.predict import predict_classification  # noqa: F401  (other jobs' recipes reuse it from here)
from tasks.tokenize import tokenize_dataset
from tasks.training import mark_new_weights


class ClassifyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: Literal["manual", "trainer"] = Field("manual", description="manual: plain PyTorch loop; trainer: HF Trainer.")
    num_labels: int | None = Field(None, gt=1, description="Number of classes (default: inferred from the data).")
    problem: Literal["single_label", "multi_label", "regression"] = Field(
        "single_label", description="single_label: one class per text; multi_label: a set of labels per text (a "
        "list column, or a delimited string with --label-separator); regression: a number per text.")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="multi_label: a label is predicted when its sigmoid "
                             "score is above this (recorded on the model).")
    class_weights: str = Field(
        "none", description="Imbalanced classes: none, balanced (from the train split's counts) or a JSON object "
        "{label: weight}; weighted cross-entropy (single_label) or BCE pos_weight (multi_label). Logged.")

    @field_validator("class_weights", mode="before")
    @classmethod
    def _weights_as_json(cls, v):  # a YAML mapping in a config file is the same as its JSON text
        import json

        return json.dumps(v) if isinstance(v, dict) else v

    @field_validator("class_weights")
    @classmethod
    def _weights_fit(cls, v: str, info: ValidationInfo) -> str:
        """The spelling, and the kind (labels are checked against the data before Prefect starts)."""
        if v != "none" and info.data.get("problem") == "regression":
            raise ValueError("class weights apply to single_label and multi_label, not regression: drop it")
        if v not in ("none", "balanced"):
            import json

            try:
                ok = isinstance(json.loads(v), dict)
            except ValueError:
                ok = False
            if not ok:
                raise ValueError('use none, balanced or a JSON object like {"negative": 1, "positive": 3}')
        return v


def _kind(spec: JobSpec):
    return kinds.of_spec(spec)


def load_model(path: str, spec: JobSpec):
    from transformers import AutoModelForSequenceClassification

    names = spec.label_names or []
    head = dict(_kind(spec).model_config(names, spec.opts))
    attrs = head.pop("config_attrs", {})  # the kind's own config entries (multi-label: the threshold), saved with it
    if spec.data.text_pair_column:  # a pair model: logged with a {text, text_pair} signature (tasks/kinds/)
        attrs["finetune_text_pair"] = True
    model = mark_new_weights(*AutoModelForSequenceClassification.from_pretrained(
        path, **head,
        use_safetensors=True,  # weights as safetensors only: a pickled pytorch_model.bin is refused
        output_loading_info=True,  # which weights are new (the classifier head): head_learning_rate_scale
    ))
    for k, v in attrs.items():
        setattr(model.config, k, v)
    return model


def tokenize(data_path: str, model: str, spec: JobSpec) -> str:
    """Texts, or pairs when the prepared data has `text_pair` (see tasks.tokenize.tokenize_dataset)."""
    return tokenize_dataset(data_path, model, spec.data.max_length, spec.data.pad_to_max_length)


def collator(tok, spec: JobSpec):
    from transformers import DataCollatorWithPadding, default_data_collator

    return default_data_collator if spec.data.pad_to_max_length else DataCollatorWithPadding(tok)


def evaluate(model, loader, device, dtype=None, desc: str = "eval") -> dict[str, Any]:
    """The kind's evaluation, found from the model's problem_type (a registry model says what it is), in the run's
    precision unless the kind is evaluated in fp32 (`EVAL_FP32`: regression)."""
    kind = kinds.of_model(model)
    return kind.evaluate(model, loader, device, None if kind.EVAL_FP32 else dtype, desc=desc)


def init_model(model, tokenized_path: str, spec: JobSpec) -> None:
    """The kind's data-dependent start of the new head (regression: its bias at the train mean)."""
    _kind(spec).init_model(model, tokenized_path, spec)


def loss_for(spec: JobSpec):
    return _kind(spec).loss_for(spec)


def trainer_class(spec: JobSpec) -> type:
    """transformers.Trainer; with a loss of the kind's own (class weights), a subclass whose compute_loss is it."""
    from transformers import Trainer

    loss = loss_for(spec)
    if loss is None:
        return Trainer

    class WeightedLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return loss(model, inputs, return_outputs=return_outputs)

    return WeightedLossTrainer


def trainer_args(spec: JobSpec, output_dir: str, kwargs: dict):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=output_dir, **kwargs)


def predict(model_uri: str, texts: list[str], top_k: int = 5) -> list:
    """The kind the logged model recorded (its MLflow metadata; single-label when none) answers."""
    meta = kinds.model_metadata(model_uri)
    return kinds.get(meta.get("problem")).predict(model_uri, texts, top_k, meta)


def check_prediction(out: list) -> str | None:
    kind = "multi_label" if out and "labels" in out[0] else "regression" if out and "value" in out[0] else None
    return kinds.get(kind).check_prediction(out)


def run_tags(info: dict, data) -> dict:
    return {"num_labels": data.num_labels, "label_names": ",".join(data.label_names or [])}


def artifacts(run_dir: str, model_dir: str, extras: dict, spec: JobSpec) -> tuple[list[str], str]:
    """The kind's: confusion matrix and per-class F1 (single-label), per-label F1 (multi-label), a scatter of
    predictions against labels (regression); the class weights used."""
    return _kind(spec).artifacts(run_dir, extras, spec)


def baseline(data_path: str, history: list[dict], spec: JobSpec) -> dict[str, float]:
    """The quality floor of the kind, on the run's eval split. A version must beat it to become champion."""
    return _kind(spec).baseline(data_path, history, spec)


def align_eval(model, spec: JobSpec):
    return _kind(spec).align_eval(model, spec)


@functools.lru_cache(maxsize=None)
def _for_problem(problem: str) -> dict:
    kind = kinds.get(problem)
    default, metrics = kind.PROMOTION
    return {"promotion": Promotion(default, metrics), "baseline_name": kind.BASELINE_NAME}


def for_options(options: dict) -> dict:
    return _for_problem(options.get("problem") or "single_label")


def resolve_spec(spec: JobSpec, data_path: str) -> JobSpec:
    return _kind(spec).resolve(spec, data_path)


def precheck(spec: JobSpec) -> None:
    """Class weights that name labels: checked against the data's labels (prepares the data; the flow reuses it)."""
    if spec.options.get("class_weights") in (None, "none", "balanced"):
        return

    data = prepare_dataset(spec.data, spec.train.seed, spec.options.get("num_labels"), spec.options.get("problem"))
    _kind(spec).resolve(spec.model_copy(update={"label_names": data.label_names}), data.path)


def _all_metrics() -> tuple[tuple[str, ...], dict]:
    names: list[str] = []
    promo: dict = {}
    for problem in kinds.PROBLEMS:
        kind = kinds.get(problem)
        names += [m for m in kind.METRICS if m not in names]
        promo.update({k: v for k, v in kind.PROMOTION[1].items() if k not in promo})
    return tuple(names), promo


METRICS, PROMOTION_METRICS = _all_metrics()

RECIPE = register(Recipe(
    name="classify",
    description="Fine-tune a sequence classifier (offline default: IMDB sentiment, bundled MiniLM).",
    example="finetune classify --train-samples 2000 --epochs 2 --engine trainer",
    options=ClassifyOptions,
    registered_model="imdb-sentiment-classifier",
    hf_task="text-classification",
    metrics=METRICS,  # every kind's (each run logs its own kind's)
    promotion=Promotion("f1", PROMOTION_METRICS),  # every kind's; `for_options` narrows them to the run's kind
    smoke_example="This movie was great!",
    tokenize=tokenize,
    load_model=load_model,
    collator=collator,
    evaluate=evaluate,
    trainer_class=trainer_class,
    trainer_args=trainer_args,
    predict=predict,
    check_prediction=check_prediction,
    run_tags=run_tags,
    artifacts=artifacts,
    align_eval=align_eval,
    baseline=baseline,
    baseline_name="majority-class",
    init_model=init_model,
    for_options=for_options,
    loss_for=loss_for,
    resolve_spec=resolve_spec,
    precheck=precheck,
    # Offline default: about 4 minutes on 2 CPU cores (see README: Speed). Length is what IMDB accuracy pays for
    # (measured, one seed: 128 tokens 0.833 on 3,000 or 6,000 reviews; 256 tokens 0.861 on 3,500 in 253 s with
    # length-grouped batches). MiniLM-sized encoders like a higher rate than BERT-base's 5e-5.
    embedded_defaults={"train_samples": 3500, "eval_samples": 1000, "max_length": 256},
    learning_rate=1e-4,
    peft_task_type="SEQ_CLS",
))
