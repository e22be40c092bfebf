"""Loading, validation, splitting and sampling of the plain `prepare_dataset` function."""
import json

import pytest
from datasets import load_from_disk

from flows.config import ConfigError, DataConfig
from tasks.data import prepare_dataset


def cfg(path, **kw):
    return DataConfig(dataset=path, text_column="review", label_column="sentiment", **kw)


def test_csv_string_labels_stratified_split(sentiment_csv, isolated):
    info = prepare_dataset(cfg(sentiment_csv, eval_fraction=0.25), seed=1)
    assert info.label_names == ["negative", "positive"] and info.num_labels == 2
    dd = load_from_disk(info.path)
    assert set(dd) == {"train", "eval"} and dd["train"].column_names == ["text", "label"]
    assert info.num_train + info.num_eval == 48
    labels = dd["eval"]["label"]
    assert labels.count(0) == labels.count(1)  # stratified
    # the same seed gives the same split (and the cached dir); another seed another split
    assert prepare_dataset(cfg(sentiment_csv, eval_fraction=0.25), seed=1).path == info.path
    other = load_from_disk(prepare_dataset(cfg(sentiment_csv, eval_fraction=0.25), seed=2).path)
    assert other["eval"]["text"] != dd["eval"]["text"]


def test_sample_counts_take_stratified_subsets(sentiment_csv, isolated):
    info = prepare_dataset(cfg(sentiment_csv, train_samples=10, eval_samples=4), seed=0)
    dd = load_from_disk(info.path)
    assert len(dd["train"]) == 10 and len(dd["eval"]) == 4
    assert dd["train"]["label"].count(0) == 5


def test_embedded_reviews_have_label_names_and_clean_text(isolated):
    info = prepare_dataset(DataConfig(train_samples=50, eval_samples=20), seed=0)
    dd = load_from_disk(info.path)
    assert info.label_names == ["negative", "positive"]
    assert not any("<br" in t for t in dd["train"]["text"])


def test_missing_file(isolated):
    with pytest.raises(ConfigError, match="not found"):
        prepare_dataset(DataConfig(dataset="/no/such/file.csv"), seed=0)


def test_missing_columns_named_with_fix(sentiment_csv, isolated):
    with pytest.raises(ConfigError) as e:
        prepare_dataset(DataConfig(dataset=sentiment_csv, text_column="body", label_column="stars"), seed=0)
    assert "'body'" in str(e.value) and "--text-column" in str(e.value) and "--label-column" in str(e.value)


def test_labels_out_of_range(tmp_path, isolated):
    p = tmp_path / "d.csv"
    p.write_text("text,label\n" + "".join(f"t{i},{i % 3}\n" for i in range(12)))
    with pytest.raises(ConfigError, match=r"outside 0..1"):
        prepare_dataset(DataConfig(dataset=str(p)), seed=0, num_labels=2)


def test_mixed_label_types(tmp_path, isolated):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i if i % 2 else "x"}) for i in range(6)))
    with pytest.raises(ConfigError):
        prepare_dataset(DataConfig(dataset=str(p)), seed=0)


def test_empty_text_dropped_or_error(tmp_path, isolated):
    p = tmp_path / "d.csv"
    p.write_text("text,label\n" + "".join(f"good {i},{i % 2}\n" for i in range(10)) + '"",0\n" ",1\n')
    assert prepare_dataset(DataConfig(dataset=str(p)), seed=0).dropped_empty == 2
    with pytest.raises(ConfigError, match="empty or null text"):
        prepare_dataset(DataConfig(dataset=str(p), empty_text="error"), seed=0)


def test_empty_split(tmp_path, isolated):
    p = tmp_path / "d.csv"
    p.write_text("text,label\n")
    with pytest.raises(ConfigError):
        prepare_dataset(DataConfig(dataset=str(p)), seed=0)


def test_not_utf8(tmp_path, isolated):
    p = tmp_path / "d.csv"
    p.write_bytes("text,label\ncaf\xe9 au lait,1\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8"):
        prepare_dataset(DataConfig(dataset=str(p)), seed=0)


def test_unknown_hub_dataset_is_a_clear_error(isolated, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="could not load Hub dataset 'no-such/dataset-xyz'"):
        prepare_dataset(DataConfig(dataset="no-such/dataset-xyz"), seed=0)
