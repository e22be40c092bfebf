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


def test_num_labels_must_match_the_labels_found(tmp_path, isolated):
    p = tmp_path / "d.csv"
    p.write_text("text,label\n" + "".join(f"t{i},{i % 3}\n" for i in range(12)))
    with pytest.raises(ConfigError, match=r"num_labels=2 but the data has 3 distinct labels \[0, 1, 2\]: drop --num-labels"):
        prepare_dataset(DataConfig(dataset=str(p)), seed=0, num_labels=2)
    assert prepare_dataset(DataConfig(dataset=str(p)), seed=0, num_labels=3).label_names == ["0", "1", "2"]


def _ints_csv(tmp_path, values, rows=40, name="d.csv"):
    p = tmp_path / name
    p.write_text("text,label\n" + "".join(f"text {i},{values[i % len(values)]}\n" for i in range(rows)))
    return str(p)


@pytest.mark.parametrize("values,names", [
    ([1, 2, 3, 4, 5], ["1", "2", "3", "4", "5"]),      # star ratings
    ([1, 2], ["1", "2"]),                               # 1/2: two classes, no phantom '0'
    ([2, 10, 9], ["2", "9", "10"]),                     # gaps, numeric (not string) order
    ([-1, 1], ["-1", "1"]),
    ([0, 1, 2], ["0", "1", "2"]),                       # exactly 0..n-1: ids, as before
])
def test_integer_labels_not_0_to_n_minus_1_are_label_names(tmp_path, isolated, values, names):
    info = prepare_dataset(DataConfig(dataset=_ints_csv(tmp_path, values)), seed=0)
    assert info.label_names == names and info.num_labels == len(names)
    dd = load_from_disk(info.path)
    for split in ("train", "eval"):  # one mapping for both splits: each row's class name is its original value
        ds = dd[split]
        assert ds.features["label"].names == names
        for text, label in zip(ds["text"], ds["label"]):
            i = int(text.split()[1])
            assert ds.features["label"].int2str(label) == str(values[i % len(values)])
    assert sorted(set(dd["train"]["label"])) == list(range(len(names)))  # every class is a real one


def test_star_ratings_with_num_labels(tmp_path, isolated):
    csv = _ints_csv(tmp_path, [1, 2, 3, 4, 5])
    assert prepare_dataset(DataConfig(dataset=csv), seed=0, num_labels=5).label_names == ["1", "2", "3", "4", "5"]
    with pytest.raises(ConfigError, match=r"num_labels=6 but the data has 5 distinct labels \[1, 2, 3, 4, 5\]"):
        prepare_dataset(DataConfig(dataset=csv), seed=0, num_labels=6)


def test_integer_labels_mapped_consistently_across_given_splits(tmp_path, isolated):
    """A file per split (as Hub datasets come): a value missing from one split still gets the same id in both."""
    import datasets

    from tasks.data import _encode_labels

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 3, 5]}),
        "eval": datasets.Dataset.from_dict({"text": ["d", "e"], "label": [5, 2]}),
    })
    out, names = _encode_labels(dd, "label", None)
    assert names == ["1", "2", "3", "5"]
    assert out["train"]["label"] == [0, 2, 3] and out["eval"]["label"] == [3, 1]


def test_a_perfect_model_on_1_2_labels_scores_f1_1(tmp_path, isolated):
    """No phantom class: macro-F1 over the real classes only (the issue: 0.667 beside accuracy 1.0)."""
    from tasks.evaluate import classification_metrics

    info = prepare_dataset(DataConfig(dataset=_ints_csv(tmp_path, [1, 2])), seed=0)
    labels = load_from_disk(info.path)["eval"]["label"]
    assert classification_metrics(labels, labels, info.num_labels) == {"accuracy": 1.0, "f1": 1.0}


def test_star_rating_model_predicts_label_names(tmp_path, isolated, tiny_model_dir):
    """A classifier built for 1..5 star data has 5 classes named by the ratings; predictions return those names."""
    from tasks.jobs import JobSpec, get
    from tasks.adapters import load_pipeline

    info = prepare_dataset(DataConfig(dataset=_ints_csv(tmp_path, [1, 2, 3, 4, 5])), seed=0)
    recipe = get("classify")
    model = recipe.load_model(tiny_model_dir, JobSpec(job="classify", label_names=info.label_names))
    assert model.config.num_labels == 5
    assert model.config.id2label == {0: "1", 1: "2", 2: "3", 3: "4", 4: "5"}
    from transformers import AutoTokenizer

    model.save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "m")
    out = load_pipeline(str(tmp_path / "m"), "text-classification")(["five stars", "one star"], top_k=None)
    assert all({r["label"] for r in row} == {"1", "2", "3", "4", "5"} for row in out)


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
