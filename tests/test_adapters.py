"""LoRA (tasks/adapters.py) on the tiny config-built BERT: what trains, what is saved, resume in the plain loop,
HF Trainer and TRL SFTTrainer, and the MLflow round trip (adapter + base reference -> registry -> load ->
predict), offline."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tasks import adapters  # noqa: E402

LABELS = ["negative", "neutral", "positive"]  # 3 labels: a base loaded without the task config has 2
TEXTS = ["a great and wonderful film", "an awful and boring film", "it was a film", "loved it , great fun"]
TARGETS = [2, 0, 1, 2]
MASKED = "a great [MASK] film"


def _model(path: str, task: str):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    from tasks.training import mark_new_weights

    torch.manual_seed(0)
    if task == "text-classification":  # loaded as the recipes do: the new weights recorded (LoRA saves them whole)
        return mark_new_weights(*AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
            output_loading_info=True))
    return mark_new_weights(*AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True))


def _lora(path: str, task: str):
    return adapters.apply_lora(_model(path, task), r=4, alpha=8, dropout=0.0, task=task)


def _batch(tok, task: str) -> dict:
    b = tok(TEXTS, return_tensors="pt", padding=True)
    if task == "text-classification":
        b["labels"] = torch.tensor(TARGETS)
    else:  # mask position 2 of every row
        labels = torch.full_like(b["input_ids"], -100)
        labels[:, 2] = b["input_ids"][:, 2]
        b["input_ids"][:, 2] = tok.mask_token_id
        b["labels"] = labels
    return b


def _train(model, batch, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _trained_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("task", ["text-classification", "fill-mask"])
def test_only_lora_and_head_train(tiny_model_dir, tok, task):
    model = _lora(tiny_model_dir, task)
    assert adapters.is_peft(model) and not adapters.is_peft(_model(tiny_model_dir, task))
    trainable, total = adapters.trainable_parameters(model)
    assert 0 < trainable < total / 50
    names = _trained_names(model)
    assert all("lora_" in n or "modules_to_save" in n for n in names)
    # saved whole: what the checkpoint did not ship (the classifier and pooler); the tiny BERT ships its MLM head,
    # so for fill-mask only the adapters train (a checkpoint without one: tests/test_families.py)
    heads = ["classifier.modules_to_save", "pooler.modules_to_save"] if task == "text-classification" else []
    assert all(any(h in n for n in names) for h in heads)
    assert task == "text-classification" or all("lora_" in n for n in names)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, _batch(tok, task))
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= set(names)

    # The frozen base is exactly the checkpoint's.
    fresh = _model(tiny_model_dir, task).state_dict()
    base = model.get_base_model().state_dict()
    q = "bert.encoder.layer.0.attention.self.query"
    assert torch.equal(base[f"{q}.base_layer.weight"], fresh[f"{q}.weight"])
    assert torch.equal(base["bert.embeddings.word_embeddings.weight"], fresh["bert.embeddings.word_embeddings.weight"])


def test_fill_mask_keeps_decoder_tied_and_adapter_small(headless_bert_dir, tok, tmp_path):
    """A checkpoint without an MLM head: the new head's transform travels with the adapter (from the new-weights
    record), the decoder (tied to the shipped embeddings) does not."""
    model = _lora(headless_bert_dir, "fill-mask")
    assert model.peft_config["default"].modules_to_save == ["cls.predictions.transform"]
    inner = model.get_base_model()
    assert inner.cls.predictions.decoder.weight is inner.bert.embeddings.word_embeddings.weight
    adapters.save_model(model, tok, tmp_path / "m")
    from safetensors import safe_open

    with safe_open(tmp_path / "m" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not any("decoder" in k or "embeddings" in k for k in keys)
    assert any("cls.predictions.transform" in k for k in keys)


@pytest.mark.parametrize("task", ["text-classification", "fill-mask"])
def test_save_and_reload_model_dir(tiny_model_dir, tok, tmp_path, task):
    model = _lora(tiny_model_dir, task)
    batch = _batch(tok, task)
    _train(model, batch)
    out = adapters.save_model(model, tok, tmp_path / "model")
    assert adapters.is_adapter_dir(out)
    assert not (out / "model.safetensors").exists()  # no copy of the base
    assert (out / "base" / "model.safetensors").resolve() == (Path(tiny_model_dir) / "model.safetensors").resolve()
    cfg = json.loads((out / "base" / "config.json").read_text())
    if task == "text-classification":
        assert cfg["id2label"] == {str(i): n for i, n in enumerate(LABELS)}

    again = adapters.load_model(out, task)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, again(**inputs).logits, atol=1e-5)
    label, score = _reference(model, tok, task)
    pipe = adapters.load_pipeline(out, task)
    top = pipe(TEXTS[0])[0] if task == "text-classification" else pipe(MASKED)[0]
    assert top.get("label", top.get("token_str", "").strip()) == label
    assert top["score"] == pytest.approx(score, abs=1e-5)


def test_plain_loop_resume_state(tiny_model_dir, tok):
    task = "text-classification"
    model = _lora(tiny_model_dir, task)
    _train(model, _batch(tok, task))
    state = adapters.model_state(model)
    assert set(state) == {"peft_adapter"}
    resumed = _lora(tiny_model_dir, task)
    adapters.load_model_state(resumed, state)
    full = _lora(tiny_model_dir, task)
    full.load_state_dict(model.state_dict())  # the full state_dict also fits a freshly wrapped model (strict)
    trained = dict(model.named_parameters())
    for other in (resumed, full):
        for n, p in other.named_parameters():
            assert torch.equal(p, trained[n]), n


def _steps_match(a, b) -> None:
    tb = dict(b.named_parameters())
    for n, p in a.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p, tb[n], atol=1e-6), n


def test_hf_trainer_checkpoints_adapter_and_resumes(tiny_model_dir, tok, tmp_path):
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    ds = Dataset.from_dict({"text": TEXTS * 2, "label": TARGETS * 2}).map(
        lambda b: tok(b["text"]), batched=True, remove_columns=["text"])

    def trainer(model, out, steps):
        args = TrainingArguments(
            output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, save_strategy="steps", save_steps=2,
            lr_scheduler_type="constant", learning_rate=1e-2, seed=0, data_seed=0, report_to="none", use_cpu=True,
        )
        return Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tok),
                       processing_class=tok)

    straight = _lora(tiny_model_dir, "text-classification")
    trainer(straight, tmp_path / "a", 4).train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()

    trainer(_lora(tiny_model_dir, "text-classification"), tmp_path / "b", 2).train()
    resumed = _lora(tiny_model_dir, "text-classification")
    trainer(resumed, tmp_path / "b", 4).train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    _steps_match(straight, resumed)


def test_sft_trainer_masked_lm_with_lora(tiny_model_dir, tok, tmp_path):
    """TRL's SFTTrainer accepts the PeftModel as is; with the model's own masked-LM loss (as the project's
    subclass does) it trains LoRA + head only, checkpoints the adapter and resumes."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer
    from trl import SFTConfig, SFTTrainer

    class MaskedLMSFT(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    pad = DataCollatorWithPadding(tok)

    def collate(features):  # deterministic masking (position 2), so two runs see the same batches
        b = pad(features)
        labels = torch.full_like(b["input_ids"], -100)
        labels[:, 2] = b["input_ids"][:, 2]
        b["input_ids"][:, 2] = tok.mask_token_id
        b["labels"] = labels
        return b

    ds = Dataset.from_dict({"text": TEXTS * 2}).map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])

    def trainer(model, out, steps):
        args = SFTConfig(
            output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, save_strategy="steps", save_steps=2,
            lr_scheduler_type="constant", learning_rate=1e-2, seed=0, data_seed=0, report_to="none", use_cpu=True,
            bf16=False, dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
            label_names=["labels"], activation_checkpointing=False,
        )
        return MaskedLMSFT(model=model, args=args, train_dataset=ds, data_collator=collate, processing_class=tok)

    straight = _lora(tiny_model_dir, "fill-mask")
    before = {n: p.detach().clone() for n, p in straight.named_parameters()}
    trainer(straight, tmp_path / "a", 4).train()
    changed = [n for n, p in straight.named_parameters() if not torch.equal(before[n], p)]
    assert changed and all("lora_" in n or "modules_to_save" in n for n in changed)
    assert (tmp_path / "a" / "checkpoint-2" / "adapter_model.safetensors").exists()

    trainer(_lora(tiny_model_dir, "fill-mask"), tmp_path / "b", 2).train()
    resumed = _lora(tiny_model_dir, "fill-mask")
    trainer(resumed, tmp_path / "b", 4).train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    _steps_match(straight, resumed)


def _reference(model, tok, task: str):
    """What the in-memory model predicts: (label, score) for TEXTS[0], or the top token for MASKED."""
    with torch.no_grad():
        if task == "text-classification":
            probs = model(**tok([TEXTS[0]], return_tensors="pt")).logits.softmax(-1)[0]
            return LABELS[int(probs.argmax())], float(probs.max())
        enc = tok([MASKED.replace("[MASK]", tok.mask_token)], return_tensors="pt")
        logits = model(**enc).logits[0, enc["input_ids"][0] == tok.mask_token_id][0]
        return tok.decode([int(logits.argmax())]).strip(), float(logits.softmax(-1).max())


@pytest.mark.parametrize("task", ["text-classification", "fill-mask"])
def test_log_register_load_predict(isolated, tiny_model_dir, tok, monkeypatch, task):
    import mlflow
    import yaml

    from tasks import tracking

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = _lora(tiny_model_dir, task)
    _train(model, _batch(tok, task), steps=5)
    label, score = _reference(model, tok, task)
    model_dir = adapters.save_model(model, tok, isolated / "run" / "model")

    run_id = tracking.start_run("lora-test", task, {"lora": True})
    example = [TEXTS[0]] if task == "text-classification" else [MASKED]
    uri = adapters.log_model(run_id, model_dir, task, input_example=example)
    name = f"lora-{task}"
    version = mlflow.register_model(uri, name).version
    registered = f"models:/{name}/{version}"

    local = Path(mlflow.artifacts.download_artifacts(registered))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["transformers"]
    # the base reference is a content-named copy of `base/` beside the store, not the run's own dir
    base_ref = Path(flavor["local_base_model_path"])
    assert base_ref.parent.name == "lora-bases" and (base_ref / "config.json").exists()
    assert adapters.shared_base_dir(model_dir / "base") == base_ref  # same content, same folder
    assert flavor["peft_adaptor"] == "peft" and "source_model_revision" not in flavor
    assert (local / "peft" / "adapter_model.safetensors").exists() and not (local / "model").exists()
    assert "peft" in {r.split("==")[0] for r in (local / "requirements.txt").read_text().split()}

    pipe = mlflow.transformers.load_model(registered)
    assert adapters.is_peft(pipe.model)
    pyfunc = mlflow.pyfunc.load_model(registered)
    if task == "text-classification":
        out = pipe(TEXTS[0])[0]
        assert out["label"] == label and out["score"] == pytest.approx(score, abs=1e-5)
        df = pyfunc.predict([TEXTS[0]])
        assert df["label"][0] == label and df["score"][0] == pytest.approx(score, abs=1e-5)
    else:
        top = pipe(MASKED, top_k=3)
        assert top[0]["token_str"].strip() == label and top[0]["score"] == pytest.approx(score, abs=1e-5)
        assert pyfunc.predict([MASKED])[0].strip() == label


def test_base_path_override_and_merged_model(isolated, tiny_model_dir, tok, monkeypatch):
    """The run's model dir deleted: the registered adapter still loads (its base reference lives beside the store).
    Elsewhere (that reference gone too): pyfunc cannot load it; transformers.load_model can with base_model_path=
    a copy of `base/`; a merged model needs nothing."""
    import mlflow

    from tasks import tracking

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = "text-classification"
    model = _lora(tiny_model_dir, task)
    _train(model, _batch(tok, task), steps=5)
    label, score = _reference(model, tok, task)
    model_dir = adapters.save_model(model, tok, isolated / "run" / "model")
    run_id = tracking.start_run("lora-test", "elsewhere", {})
    uri = adapters.log_model(run_id, model_dir, task)
    merged_uri = adapters.log_model(run_id, model_dir, task, merge=True)

    moved = isolated / "elsewhere" / "base"
    shutil.copytree(model_dir / "base", moved, symlinks=False)  # real files, not links
    shared = adapters.shared_base_dir(model_dir / "base")  # the folder the registered model references
    shutil.rmtree(model_dir)
    assert mlflow.pyfunc.load_model(uri).predict([TEXTS[0]])["label"][0] == label  # run dir cleanup is harmless
    shutil.rmtree(shared)
    with pytest.raises(Exception):
        mlflow.pyfunc.load_model(uri)
    out = mlflow.transformers.load_model(uri, base_model_path=str(moved))(TEXTS[0])[0]
    assert out["label"] == label and out["score"] == pytest.approx(score, abs=1e-5)

    merged_local = Path(mlflow.artifacts.download_artifacts(merged_uri))
    assert (merged_local / "model").is_dir() and not (merged_local / "peft").exists()
    df = mlflow.pyfunc.load_model(merged_uri).predict([TEXTS[0]])
    assert df["label"][0] == label and df["score"][0] == pytest.approx(score, abs=1e-5)
    assert os.path.getsize(merged_local / "model" / "model.safetensors") > 0.9 * os.path.getsize(
        Path(tiny_model_dir) / "model.safetensors")
