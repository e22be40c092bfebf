"""tasks/search.py as plain functions (no Prefect, no Ray): the search space, the storage beside the tracking data,
the pruning hook a trial calls after each evaluation (from a re-created trial, as on a Ray worker), resume and
duplicates; and the sweep plan's side of it in flows/sweep.py."""
import pickle

import optuna
import pytest

from tasks import search
from tasks.search import TrialPruned


def test_parameters_map_to_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    d = search.distributions({"train.learning_rate": {"min": 1e-5, "max": 1e-3, "log": True},
                              "train.warmup_ratio": {"min": 0.0, "max": 0.2},
                              "train.batch_size": {"min": 8, "max": 32},
                              "train.lr_scheduler": ["linear", "cosine"],
                              "lora.target_modules": [["query"], ["query", "value"]]}, {"train.batch_size"})
    assert d["train.learning_rate"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert d["train.warmup_ratio"] == FloatDistribution(0.0, 0.2)
    assert d["train.batch_size"] == IntDistribution(8, 32)
    assert d["train.lr_scheduler"] == CategoricalDistribution(["linear", "cosine"])
    # a list value is not an Optuna choice: it travels as JSON and comes back as the list
    params = {"lora.target_modules": [["query"], ["query", "value"]]}
    assert search.decode(params, search.encode(params, {"lora.target_modules": ["query", "value"]})) == {
        "lora.target_modules": ["query", "value"]}
    assert search.space_size(search.distributions({"a": [1, 2, 3], "b": {"min": 1, "max": 4}}, {"b"})) == 12
    assert search.space_size(d) == float("inf")
    with pytest.raises(search.ConfigError, match="min > 0"):
        search.distributions({"x": {"min": 0.0, "max": 1.0, "log": True}})


def test_storage_lies_beside_the_tracking_data(tmp_path, monkeypatch):
    monkeypatch.delenv(search.STORAGE_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_BACKEND_STORE_URI", raising=False)
    assert search.storage_url(f"sqlite:///{tmp_path}/m/mlflow.db?timeout=60") == f"sqlite:///{tmp_path}/m/optuna.db"
    pg = "postgresql://u:pw@127.0.0.1:5432/mlflow"
    assert search.storage_url(pg) == pg  # the same database (Optuna's tables in their own schema)
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", pg)  # a tracking server's own store, as mlflow/server.sh reads it
    assert search.storage_url("http://127.0.0.1:5000") == pg
    monkeypatch.setenv(search.STORAGE_ENV, f"sqlite:///{tmp_path}/own.db")
    assert search.storage_url("http://127.0.0.1:5000") == f"sqlite:///{tmp_path}/own.db"


def _study(tmp_path, name="sweep-classify-abc-1", pruner="median", startup=1):
    storage = search.open_storage(f"sqlite:///{tmp_path}/optuna.db")
    return optuna.create_study(storage=storage, study_name=name, direction="maximize",
                               pruner=search.make_pruner(pruner, startup), load_if_exists=True)


def test_the_pruning_hook_reports_through_the_storage_and_stops_a_loser(tmp_path):
    study = _study(tmp_path)
    dist = {"lr": optuna.distributions.CategoricalDistribution([1e-2, 1e-9])}
    good = study.ask(dist)
    for epoch, f1 in ((1, 0.7), (2, 0.8), (3, 0.9)):
        good.report(f1, epoch)
    study.tell(good, 0.9)
    bad = study.ask(dist)
    # what a Ray worker gets: names only, pickled; it loads the study and re-creates the trial from the storage
    hook = pickle.loads(pickle.dumps(search.PruningReporter(f"sqlite:///{tmp_path}/optuna.db", study.study_name,
                                                            bad._trial_id, "median", 1, "eval_f1")))
    hook(1, {"eval_f1": 0.75, "eval_loss": 0.1})  # ahead of the finished trial at epoch 1: goes on
    # the median pruner compares the trial's best value so far (0.75) with the others' at the same epoch (0.8)
    with pytest.raises(TrialPruned) as e:
        hook(2, {"eval_f1": 0.3, "eval_loss": 0.9})
    assert (e.value.epoch, e.value.metric, e.value.value) == (2, "eval_f1", 0.3)
    assert e.value.metrics == {"eval_f1": 0.3, "eval_loss": 0.9}
    assert e.value.reason.startswith("median pruner: eval_f1 0.3000 at epoch 2; the other 1 trial(s) at epoch 2")
    assert study.trials[bad.number].intermediate_values == {1: 0.75, 2: 0.3}
    search.tell(study, bad.number, "PRUNED", None)
    assert study.trials[bad.number].state == optuna.trial.TrialState.PRUNED
    hook_none = search.PruningReporter(f"sqlite:///{tmp_path}/optuna.db", study.study_name, bad._trial_id, "median",
                                       1, "eval_f1")
    hook_none(3, {"eval_loss": 0.1})  # no value of its metric: nothing to compare, nothing reported


def test_resume_finds_the_newest_study_of_the_search_and_closes_interrupted_trials(tmp_path):
    storage = search.open_storage(f"sqlite:///{tmp_path}/optuna.db")
    fam = search.study_family({"job": "classify", "parameters": {"train.learning_rate": [1e-3]}})
    assert fam.startswith("sweep-classify-") and fam == search.study_family(
        {"parameters": {"train.learning_rate": [1e-3]}, "job": "classify"})
    first = search.open_study(storage, fam, f"{fam}-1", False, True, None, None)
    other = search.open_study(storage, "sweep-classify-other", "sweep-classify-other-9", False, True, None, None)
    assert other.study_name != first.study_name
    dist = {"lr": optuna.distributions.CategoricalDistribution([1e-2, 1e-3, 1e-4])}
    done = first.ask(dist)
    first.tell(done, 0.5)
    killed = first.ask(dist)  # left RUNNING by a killed sweep
    again = search.open_study(storage, fam, f"{fam}-2", True, True, None, None)
    assert again.study_name == first.study_name  # resume: the same study
    assert search.close_interrupted(again) == 1
    assert again.trials[killed.number].state == optuna.trial.TrialState.FAIL
    assert [t.number for t in search.finished(again)] == [done.number]
    # a proposal that repeats a finished trial is not trained: closed as FAIL, marked
    again.enqueue_trial(done.params)
    repeat = again.ask(dist)
    assert search.duplicate_of(again, repeat) == done.number
    search.reject_duplicate(again, repeat, done.number)
    assert again.trials[repeat.number].system_attrs["finetune.duplicate_of"] == done.number
    assert search.open_study(storage, fam, f"{fam}-3", False, True, None, None).study_name == f"{fam}-3"  # new


def test_samplers_and_pruners_by_name():
    assert isinstance(search.make_sampler("tpe", 0, 3, concurrent=2), optuna.samplers.TPESampler)
    assert isinstance(search.make_pruner("asha"), optuna.pruners.SuccessiveHalvingPruner)
    assert isinstance(search.make_pruner("hyperband"), optuna.pruners.HyperbandPruner)
    assert isinstance(search.make_pruner("none"), optuna.pruners.NopPruner)
    with pytest.raises(search.ConfigError, match="not an Optuna sampler"):
        search.make_sampler("grid", 0, 3)


def test_sweep_plan_resumes_where_it_stopped_and_checks_model_based_spaces(tmp_path):
    from flows.sweep import SweepConfig, int_fields, probe_overrides, remaining_plan, trial_configs

    grid = SweepConfig(parameters={"train.learning_rate": [1e-4, 2e-4, 3e-4], "train.warmup_ratio": [0.0, 0.1]},
                       max_trials=3)
    done = [{"train.learning_rate": 1e-4, "train.warmup_ratio": 0.0},
            {"train.learning_rate": 1e-4, "train.warmup_ratio": 0.1}]
    assert remaining_plan(grid, done) == [{"train.learning_rate": 2e-4, "train.warmup_ratio": 0.0},
                                          {"train.learning_rate": 2e-4, "train.warmup_ratio": 0.1},
                                          {"train.learning_rate": 3e-4, "train.warmup_ratio": 0.0}]
    tpe = SweepConfig.model_validate({"method": "tpe", "pruner": "median", "parameters": {
        "train.learning_rate": {"min": 1e-5, "max": 1e-3, "log": True}, "train.batch_size": {"min": 8, "max": 16},
        "train.lr_scheduler": ["linear", "cosine"]}})
    assert int_fields(tpe) == {"train.batch_size"}
    assert probe_overrides(tpe)[0] == {"train.learning_rate": 1e-5, "train.batch_size": 8, "train.lr_scheduler": "linear"}
    assert len(trial_configs(tpe)) == 4  # first point + the other end of each parameter
    bad = tpe.model_copy(update={"parameters": {**tpe.parameters, "train.batch_size": [0, 8]}})
    with pytest.raises(search.ConfigError) as e:
        trial_configs(bad)
    assert any("batch_size" in p for p in e.value.problems)
    ddp = tpe.model_copy(update={"base": {"train": {"nproc_per_node": 2}}})
    with pytest.raises(search.ConfigError, match="single-process trials"):
        trial_configs(ddp)


@pytest.mark.parametrize("engine", ["manual", "trainer"])
def test_the_evaluation_hook_sees_each_epoch_and_stops_training(engine, sentiment_csv, tiny_model_dir, tmp_path,
                                                                isolated):
    """`train(on_evaluation=...)`, both engines: called after each epoch's evaluation with its metrics (after
    on_metrics logged them); what it raises stops the run there and comes out of `train` as it is."""
    from flows.config import ClassifyConfig
    from tasks.data import prepare_dataset
    from tasks.tokenize import tokenize_dataset
    from tasks.training import train

    cfg = ClassifyConfig.model_validate({
        "engine": engine,
        "data": {"dataset": sentiment_csv, "text_column": "review", "label_column": "sentiment", "max_length": 16,
                 "eval_fraction": 0.25},
        "train": {"model": tiny_model_dir, "dropout": None, "group_by_length": False, "epochs": 3, "batch_size": 8,
                  "learning_rate": 1e-2, "warmup_ratio": 0.0, "output_dir": str(tmp_path / "out")}})
    data = prepare_dataset(cfg.data, cfg.train.seed)
    tok = tokenize_dataset(data.path, cfg.train.model, cfg.data.max_length)
    seen, logged = [], []

    def hook(epoch, metrics):
        seen.append((epoch, metrics))
        if epoch == 2:
            raise TrialPruned(epoch, "eval_f1", metrics["eval_f1"], "test", metrics)

    with pytest.raises(TrialPruned) as e:
        train(cfg.spec(data.label_names), tok, str(tmp_path / "run"), on_metrics=lambda m, s: logged.append(s),
              on_evaluation=hook)
    assert [s for s, _ in seen] == [1, 2] and e.value.epoch == 2
    assert {"eval_f1", "eval_loss", "train_loss"} <= set(seen[0][1]) and logged == [1, 2]
    assert not (tmp_path / "run" / "model").exists()  # stopped before anything was saved


def test_asha_stops_a_trial_outside_the_top_third_of_its_rung(tmp_path):
    study = _study(tmp_path, pruner="asha")
    dist = {"lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)}

    def hook(trial):  # the pruner records each trial's rung as it reports, through the hook
        return search.PruningReporter(f"sqlite:///{tmp_path}/optuna.db", study.study_name, trial._trial_id, "asha",
                                      2, "eval_f1")

    first = study.ask(dist)
    hook(first)(1, {"eval_f1": 0.9})  # alone at its rung: promoted
    slow = study.ask(dist)
    with pytest.raises(TrialPruned, match="asha pruner: eval_f1 0.5000 at epoch 1; the other 1 trial"):
        hook(slow)(1, {"eval_f1": 0.5})  # not in the top third of the rung's 2 trials
    fast = study.ask(dist)
    hook(fast)(1, {"eval_f1": 0.95})  # the best at its rung: promoted, goes on
