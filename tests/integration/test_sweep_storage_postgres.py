"""A sweep's Optuna study in a PostgreSQL tracking database (tasks/search.py): Optuna's tables in a schema
`optuna` of MLflow's own database, beside MLflow's tables (both keep an `alembic_version`), reached by the driver
and by the pruning hook through the storage alone, as from a Ray worker on another machine."""
from __future__ import annotations

import pickle

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_study_lives_in_its_own_schema_of_the_tracking_database(monkeypatch):
    import optuna
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from tasks import search
    from tests.servers import PostgresServer

    with PostgresServer().running() as pg:
        url = pg.create_database("mlflow")
        SqlAlchemyStore(url, "/tmp/unused-artifacts")  # MLflow's tables first, as a tracking server creates them
        monkeypatch.delenv(search.STORAGE_ENV, raising=False)
        monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", url)  # what mlflow/server.sh serves
        assert search.storage_url("http://127.0.0.1:5000") == url
        storage = search.open_storage(url)
        study = search.open_study(storage, "sweep-classify-pg", "sweep-classify-pg-1", False, True, None, None)
        dist = {"lr": optuna.distributions.CategoricalDistribution([1e-2, 1e-9])}
        good = study.ask(dist)
        good.report(0.9, 1)
        study.tell(good, 0.9)
        bad = study.ask(dist)
        hook = pickle.loads(pickle.dumps(search.PruningReporter(url, study.study_name, bad._trial_id, "median", 1,
                                                                "eval_f1")))
        with pytest.raises(search.TrialPruned):
            hook(1, {"eval_f1": 0.3})
        search.tell(study, bad.number, "PRUNED", None)
        again = search.open_study(search.open_storage(url), "sweep-classify-pg", "sweep-classify-pg-2", True, True,
                                  None, None)
        assert again.study_name == study.study_name and len(search.finished(again)) == 2
        assert pg.psql("mlflow", "select count(*) from optuna.trials") == "2"
        assert pg.psql("mlflow", "select count(*) from public.experiments") == "1"  # MLflow's Default experiment
        mlflow_rev = pg.psql("mlflow", "select version_num from public.alembic_version")
        optuna_rev = pg.psql("mlflow", "select version_num from optuna.alembic_version")
        assert mlflow_rev and optuna_rev and mlflow_rev != optuna_rev
