import pytest

from flows.config import ClassifyConfig, ConfigError, MLMConfig, build_config


def test_defaults_are_the_offline_job():
    cfg = ClassifyConfig()
    assert cfg.data.dataset == "movie-reviews"
    assert cfg.train.model == "bundled-minilm"
    assert cfg.data.train_samples == 3500 and cfg.data.max_length == 256 and cfg.engine == "manual"
    assert cfg.train.group_by_length and cfg.train.dropout == 0.0 and cfg.train.freeze_embeddings
    assert MLMConfig().data.label_column is None and MLMConfig().data.max_length == 128
    mlm = MLMConfig()
    assert mlm.data.train_samples == 2000 and mlm.train.batch_size == 8 and mlm.train_mlm_probability == 0.3
    assert mlm.train.head_learning_rate_scale == 10.0 and mlm.unigram_head_bias
    assert ClassifyConfig().train.batch_size == 16  # a job's train defaults are its own
    assert ClassifyConfig().train.head_learning_rate_scale == 1.0
    assert MLMConfig(train={"batch_size": 32}).train.batch_size == 32
    # an explicit value wins over the embedded data's default (YAML or flag)
    assert ClassifyConfig(data={"max_length": 128}).data.max_length == 128


def test_precedence_defaults_yaml_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  epochs: 3\n  batch_size: 8\ndata:\n  max_length: 64\n")
    cfg = build_config(ClassifyConfig, str(y), {"train": {"epochs": 5}})
    assert cfg.train.epochs == 5  # flag beats YAML
    assert cfg.train.batch_size == 8  # YAML beats default
    assert cfg.data.max_length == 64
    assert cfg.train.learning_rate == ClassifyConfig().train.learning_rate


def test_unknown_keys_and_bad_values_reported_together(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  epocs: 3\n  batch_size: 0\n")
    with pytest.raises(ConfigError) as e:
        build_config(ClassifyConfig, str(y))
    msg = str(e.value)
    assert "unknown config key 'train.epocs'" in msg and "train.batch_size" in msg
    assert len(e.value.problems) == 2


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        build_config(ClassifyConfig, "/nonexistent.yaml")


def test_flat_params_cover_whole_config():
    flat = ClassifyConfig().flat()
    assert flat["train.learning_rate"] == 1e-4 and flat["engine"] == "manual" and flat["data.max_length"] == 256
