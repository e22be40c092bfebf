"""The `finetune` CLI generated from the job configs: fast, no training (run_job is replaced by a recorder)."""
from __future__ import annotations

import argparse
from typing import ClassVar, Literal

import pytest

from tasks.training import TrainConfig
from pydantic import BaseModel, Field

import flows.train
from flows import cli
from flows.config import ClassifyConfig, JobConfig, MLMConfig, job_configs


@pytest.fixture(autouse=True)
def _local_store(tmp_path, monkeypatch):
    """Every command here talks to a private sqlite store, whatever MLFLOW_TRACKING_URI the session carries."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'cli-mlflow.db'}")


@pytest.fixture
def ran(monkeypatch):
    """Replaces the training flow: records the config it would have run."""
    seen: list = []

    def fake_run_job(cfg):
        seen.append(cfg)
        return {"job": cfg.job, "run_id": "r1"}

    monkeypatch.setattr(flows.train, "run_job", fake_run_job)
    monkeypatch.setattr(flows.train, "precheck", lambda cfg: None)  # these tests parse flags: no model or data
    return seen


def run(argv, ran):
    rc = cli.main(argv)
    return rc, (ran[-1] if ran else None)


def _fields(cls):
    """(path, flag, field, default) for every settable field of a job config, by the documented rule."""
    dump = cls().model_dump()
    for name, f in cls.model_fields.items():
        if cli._is_fixed(f.annotation):
            continue
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            prefix = "" if name in ("data", "train", "tracking") else f"{name}-"
            for sub, sf in f.annotation.model_fields.items():
                yield (name, sub), f"--{prefix}{sub.replace('_', '-')}", sf, dump[name][sub]
        else:
            yield (name,), f"--{name.replace('_', '-')}", f, dump[name]


def _argv_for(flag, default):
    """Flag and value that set the field to its (job) default value explicitly."""
    if isinstance(default, bool):
        return [flag if default else f"--no-{flag[2:]}"]
    if default is None:
        return [flag, "null"]
    if isinstance(default, list):
        return [flag, ",".join(map(str, default))]
    return [flag, str(default)]


def _get(cfg_dump, path):
    for k in path:
        cfg_dump = cfg_dump[k]
    return cfg_dump


@pytest.mark.parametrize("job", list(job_configs()))
def test_every_config_field_has_a_flag_that_parses(job, capsys):
    cls = job_configs()[job]
    assert cli.main([job, "--help"]) == 0
    help_text = capsys.readouterr().out
    cmd = cli.job_command(job, cls)
    n = 0
    for path, flag, field, default in _fields(cls):
        n += 1
        assert flag in help_text, f"{'.'.join(path)} has no {flag} in `finetune {job} --help`"
        assert (field.description or "").split()[0] in help_text
        ctx = cmd.make_context(job, _argv_for(flag, default))
        overrides = cli.overrides_from(ctx, cmd.params)
        assert _get(overrides, path) == default, (flag, overrides)
        # only that flag became an override
        assert sum(len(v) if isinstance(v, dict) else 1 for v in overrides.values()) == 1
    assert n >= 40  # data + train + tracking + lora + the job's own fields
    assert "--job" not in help_text  # the fixed field is no flag


def test_old_flag_names_map_to_config_values(ran):
    rc, cfg = run(["classify", "--dataset", "reviews.csv", "--dataset-config", "plain", "--train-split", "tr",
                   "--eval-split", "ev", "--text-column", "body", "--label-column", "stars", "--train-samples", "40",
                   "--eval-samples", "10", "--max-length", "64", "--model", "bert-base-cased", "--engine", "trainer",
                   "--epochs", "3", "--batch-size", "8", "--learning-rate", "3e-5", "--seed", "7",
                   "--output-dir", "/tmp/o", "--device", "cpu", "--precision", "bf16", "--checkpoint-every-steps",
                   "50", "--resume", "--registered-model", "m", "--experiment", "e", "--run-name", "n",
                   "--promotion-metric", "f1", "--promotion-margin", "0.01", "--no-promote", "--num-labels", "5"], ran)
    assert rc == 0
    d, t, tr = cfg.data, cfg.train, cfg.tracking
    assert (d.dataset, d.dataset_config, d.train_split, d.eval_split) == ("reviews.csv", "plain", "tr", "ev")
    assert (d.text_column, d.label_column, d.train_samples, d.eval_samples) == ("body", "stars", 40, 10)
    assert d.max_length == 64
    assert (t.model, t.epochs, t.batch_size, t.learning_rate, t.seed) == ("bert-base-cased", 3, 8, 3e-5, 7)
    assert (t.output_dir, t.device, t.precision) == ("/tmp/o", "cpu", "bf16")
    assert (t.checkpoint_every_steps, t.resume) == (50, True)
    assert (tr.registered_model, tr.experiment, tr.run_name) == ("m", "e", "n")
    assert (tr.promotion_metric, tr.promotion_margin, tr.promote) == ("f1", 0.01, False)
    assert (cfg.engine, cfg.num_labels) == ("trainer", 5)

    rc, cfg = run(["mlm", "--engine", "manual", "--mlm-probability", "0.2", "--top-k", "3", "--no-group-texts"], ran)
    assert rc == 0 and isinstance(cfg, MLMConfig)
    assert (cfg.engine, cfg.mlm_probability, cfg.top_k, cfg.group_texts) == ("manual", 0.2, 3, False)


def test_new_fields_lora_lists_and_null(ran):
    rc, cfg = run(["classify", "--peft", "lora", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.05",
                   "--lora-target-modules", "query,key", "--lora-target-modules", "value", "--eval-batch-size", "32",
                   "--weight-decay", "0", "--warmup-ratio", "0.05", "--lr-scheduler", "cosine",
                   "--max-grad-norm", "0.5",
                   "--eval-fraction", "0.1", "--pad-to-max-length", "--no-clean-html", "--empty-text", "error",
                   "--train-samples", "null"], ran)
    assert rc == 0
    assert cfg.peft == "lora" and (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (4, 8, 0.05)
    assert cfg.lora.target_modules == ["query", "key", "value"]
    t, d = cfg.train, cfg.data
    assert (t.eval_batch_size, t.weight_decay, t.warmup_ratio) == (32, 0.0, 0.05)
    assert (t.lr_scheduler, t.max_grad_norm) == ("cosine", 0.5)
    assert (d.eval_fraction, d.pad_to_max_length, d.clean_html, d.empty_text) == (0.1, True, False, "error")
    assert d.train_samples is None  # `null` unsets an optional field (all of the data)


def test_precedence_defaults_yaml_flags(tmp_path, ran):
    y = tmp_path / "c.yaml"
    y.write_text("train: {epochs: 3, batch_size: 8}\ndata: {max_length: 64}\ntracking: {promote: false}\n")
    rc, cfg = run(["classify", "--config", str(y), "--epochs", "5"], ran)
    assert rc == 0
    assert cfg.train.epochs == 5  # flag beats YAML
    assert cfg.train.batch_size == 8 and cfg.data.max_length == 64  # YAML beats default
    assert cfg.tracking.promote is False  # a bool flag not given does not reset the YAML
    assert cfg.train.learning_rate == ClassifyConfig().train.learning_rate == 1e-4  # the job's default
    rc, cfg = run(["classify", "--config", str(y), "--promote"], ran)
    assert cfg.tracking.promote is True  # an explicit flag does


def test_flags_not_given_never_override_yaml(tmp_path, ran):
    y = tmp_path / "c.yaml"
    y.write_text(
        "data: {train_samples: 50, eval_samples: 20, clean_html: false, label_column: stars}\n"
        "train: {learning_rate: 2.0e-5, resume: true, checkpoint_every_steps: 9}\n"
        "peft: lora\nlora: {target_modules: [key], r: 2}\ngroup_texts: false\ntop_k: 9\n"
    )
    rc, cfg = run(["mlm", "--config", str(y)], ran)
    assert rc == 0
    d = cfg.data
    assert (d.train_samples, d.eval_samples, d.clean_html, d.label_column) == (50, 20, False, "stars")
    assert (cfg.train.learning_rate, cfg.train.resume, cfg.train.checkpoint_every_steps) == (2e-5, True, 9)
    assert (cfg.peft, cfg.lora.target_modules, cfg.lora.r) == ("lora", ["key"], 2)
    assert (cfg.group_texts, cfg.top_k) == (False, 9)


@pytest.mark.parametrize("job,cls", list(job_configs().items()))
def test_help_shows_description_example_and_defaults(job, cls, capsys):
    assert cli.main([job, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo click's wrapping
    assert " ".join(cls.description.split()) in out and cls.example in out
    desc = " ".join(TrainConfig.model_fields["learning_rate"].description.split())
    assert desc in out
    lr = cls().train.learning_rate
    assert f"--learning-rate F {desc} [default: {lr}]" in out  # the job's real default
    assert f"[default: {cls().data.train_samples}]" in out
    assert "--promote / --no-promote" in out and "--resume / --no-resume" in out


def test_mlm_help_shows_validator_defaults(capsys):
    assert cli.main(["mlm", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "[default: 0.0003]" in out  # learning rate filled in by MLMConfig's validator, not TrainConfig's 5e-05
    assert "--label-column TEXT|null Column holding the label (ints, ClassLabel or strings). [default: null]" in out
    assert "--no-group-texts" in out and "--num-labels" not in out


def test_bad_flag_value_is_a_usage_error(ran, capsys):
    assert cli.main(["classify", "--epochs", "abc"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--epochs" in lines[0]
    assert "Traceback" not in err and not ran
    assert cli.main(["classify", "--engine", "sft"]) == 2  # not one of this job's engines
    assert "--engine" in capsys.readouterr().err
    assert cli.main(["mlm", "--num-labels", "3"]) == 2  # a classify-only flag
    assert "--num-labels" in capsys.readouterr().err


def test_config_errors_one_message_exit_2(tmp_path, ran, capsys):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  epocs: 3\n")
    assert cli.main(["classify", "--config", str(y), "--batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "unknown config key 'train.epocs'" in err and "train.batch_size" in err
    assert "Traceback" not in err and not ran
    assert cli.main(["classify", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_json_output(ran, capsys):
    assert cli.main(["classify", "--json"]) == 0
    assert '"run_id": "r1"' in capsys.readouterr().out


class ToyConfig(JobConfig):
    description: ClassVar[str] = "A toy job registered for the test."
    example: ClassVar[str] = "finetune toy --toy-level 3"
    job: Literal["toy"] = "toy"
    toy_level: int = Field(2, gt=0, description="How toy it is.")
    tags: list[str] = Field(default_factory=list, description="Free tags.")


def test_subcommands_come_from_the_job_registry(monkeypatch, ran, capsys):
    import flows.config

    monkeypatch.setattr(flows.config, "job_configs", lambda: {**job_configs(), "toy": ToyConfig})
    assert cli.main(["--help"]) == 0
    assert "A toy job registered for the test." in capsys.readouterr().out
    rc, cfg = run(["toy", "--toy-level", "3", "--tags", "a,b", "--epochs", "2"], ran)
    assert rc == 0 and isinstance(cfg, ToyConfig)
    assert (cfg.toy_level, cfg.tags, cfg.train.epochs) == (3, ["a", "b"], 2)


def test_clashing_flags_are_caught():
    class Clash(JobConfig):
        job: Literal["clash"] = "clash"
        epochs: int = Field(1, description="Same flag as train.epochs.")

    with pytest.raises(RuntimeError, match="--epochs"):
        cli.job_command("clash", Clash)


def test_other_subcommands(monkeypatch, capsys):
    import flows.manage

    seen: dict[str, argparse.Namespace] = {}
    for name in ("compare", "promote", "rollback"):
        monkeypatch.setattr(flows.manage, f"{name}_cli", lambda a, name=name: seen.setdefault(name, a) and 0)
    assert cli.main(["compare", "--registered-model", "m"]) == 0
    assert cli.main(["promote", "--registered-model", "m", "--version", "3"]) == 0
    assert cli.main(["rollback", "--registered-model", "m"]) == 0
    assert seen["compare"].registered_model == "m"
    assert (seen["promote"].registered_model, seen["promote"].version) == ("m", 3)
    assert seen["rollback"].registered_model == "m"

    for name in ("predict", "compare", "promote", "rollback"):
        assert cli.main([name, "--help"]) == 0
        out = capsys.readouterr().out
        assert "Example:" in out and f"finetune {name} --registered-model" in out
    assert cli.main(["promote", "--registered-model", "m"]) == 2  # --version is required
    assert cli.main(["predict", "--registered-model", "m", "--alias", "a", "--version", "2"]) == 2
    assert "mutually exclusive" in capsys.readouterr().err
    assert cli.main(["predict", "--registered-model", "m", "--file", "/nonexistent.txt"]) == 2
    assert capsys.readouterr().err.startswith("error: --file")


def test_predict_dispatch(monkeypatch, tmp_path, capsys):
    import tasks.predict

    calls = []
    def fake_predict(uri, texts, k):
        calls.append((uri, texts, k))
        return [{"text": "x", "label": "pos", "score": 0.9}]

    monkeypatch.setattr(tasks.predict, "predict", fake_predict)
    f = tmp_path / "t.txt"
    f.write_text("one\n\ntwo\n")
    argv = ["predict", "--registered-model", "m", "--version", "4", "--file", str(f), "--top-k", "2", "--json", "zero"]
    assert cli.main(argv) == 0
    assert calls == [("models:/m/4", ["zero", "one", "two"], 2)]
    assert '"text": "x"' in capsys.readouterr().out
    assert cli.main(["predict", "--registered-model", "m", "a [MASK]"]) == 0
    assert calls[-1] == ("models:/m@champion", ["a [MASK]"], 5)
