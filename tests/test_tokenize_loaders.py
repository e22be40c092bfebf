import pytest
import torch
from datasets import load_from_disk

from flows.config import ConfigError, DataConfig
from tasks.data import prepare_dataset
from tasks.loaders import build_dataloaders
from tasks.tokenize import check_model, tokenize_dataset


@pytest.fixture
def prepared(sentiment_csv, isolated):
    return prepare_dataset(DataConfig(dataset=sentiment_csv, text_column="review", label_column="sentiment"), seed=0)


def test_tokenize_columns_and_truncation(prepared, tiny_model_dir):
    path = tokenize_dataset(prepared.path, tiny_model_dir, max_length=7)
    dd = load_from_disk(path)
    cols = set(dd["train"].column_names)
    assert cols == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    lengths = [len(x) for x in dd["train"]["input_ids"]]
    assert max(lengths) == 7 and min(lengths) < 7  # truncated, not padded (dynamic padding later)


def test_dynamic_padding_and_padding_to_max(prepared, tiny_model_dir):
    dyn = build_dataloaders(tokenize_dataset(prepared.path, tiny_model_dir, 32), tiny_model_dir, 4, 8, seed=0)
    batch = next(iter(dyn["train"]))
    assert batch["input_ids"].shape[1] < 32 and batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["labels"].dtype == torch.long
    fixed = build_dataloaders(tokenize_dataset(prepared.path, tiny_model_dir, 32, True), tiny_model_dir, 4, 8, 0, True)
    assert next(iter(fixed["train"]))["input_ids"].shape[1] == 32


def test_seeded_shuffle(prepared, tiny_model_dir):
    path = tokenize_dataset(prepared.path, tiny_model_dir, 16)
    first = lambda s: next(iter(build_dataloaders(path, tiny_model_dir, 4, 8, seed=s)["train"]))["input_ids"]
    assert torch.equal(first(3), first(3))
    assert not torch.equal(first(3), first(4))


def test_max_length_above_position_limit(tiny_model_dir):
    with pytest.raises(ConfigError, match="exceeds .* position limit of 128"):
        check_model(tiny_model_dir, 512)


def test_unknown_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="could not load model"):
        check_model("no-such-org/no-such-model", 128)
