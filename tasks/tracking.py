"""MLflow tracking: where the store is, one run per flow run, params, per-epoch metrics (with retry and backoff
so a short server outage does not kill training), artifacts, and the model in the transformers flavor.
Every call passes `run_id` explicitly: MLflow's fluent active run is thread-local and Prefect runs tasks in
worker threads."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Iterator


from tasks import kinds
from tasks.common import PROJECT_ROOT, ConfigError, input_limit

log = logging.getLogger(__name__)

# Local default store (no server to start): sqlite for runs + registry, a folder for artifacts.
STORE_DIR = Path(os.environ.get("FINETUNE_MLFLOW_STORE", PROJECT_ROOT / "mlflow" / "store"))


def default_tracking_uri() -> str:
    # timeout: a writer waits up to 60 s for another process's transaction instead of failing "database is locked"
    return f"sqlite:///{STORE_DIR / 'mlflow.db'}?timeout=60"


def _sqlite_path(uri: str) -> str:
    return uri[len("sqlite:///"):].split("?", 1)[0]


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set (a real server or another store), else the local sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def store_id(uri: str | None = None) -> str:
    """Which tracking store `uri` (default: this process's) is, with no credential and no option in it: sqlite and
    file stores by their absolute path, servers and databases by scheme, host, port and path. Recorded in each run dir
    (`tasks.liveness.RECORD`) so `finetune gc` can tell its own store's runs from another store's."""
    from urllib.parse import urlsplit, urlunsplit

    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        return "sqlite:///" + str(Path(_sqlite_path(uri)).resolve())
    if uri.startswith("/") or uri.startswith("file:"):
        return "file://" + str(Path(uri.removeprefix("file://").removeprefix("file:")).resolve())
    u = urlsplit(uri)
    host = (u.hostname or "").lower() + (f":{u.port}" if u.port else "")
    return urlunsplit((u.scheme.lower(), host, u.path.rstrip("/"), "", ""))


# --- credentials: never printed, logged or recorded ------------------------------------------------------------
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^/@:\s]*):(?P<pw>[^@/\s]*)@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:password|passwd|pwd|token|access_token|secret|api_key|apikey|key)=)[^&#\s]*")


def redact_uri(text: Any) -> str:
    """`scheme://user:password@host` -> `scheme://user:***@host`, and secret-looking query values -> `***`, anywhere in
    `text`: for every tracking URI (or message holding one) that is printed, logged or recorded."""
    s = str(text)
    s = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", s)
    return _SECRET_QUERY.sub(r"\1***", s)


def display_uri() -> str:
    """The tracking URI as it may be shown: credentials redacted."""
    return redact_uri(tracking_uri())


# --- authentication and permissions (MLflow's basic-auth server) -----------------------------------------------
def auth_status(e: BaseException) -> int | None:
    """401 or 403 when `e` is the tracking server refusing the caller (MLflow's UNAUTHENTICATED / PERMISSION_DENIED,
    or an HTTP error response of a raw request), else None. Such errors are never retried."""
    code = getattr(e, "error_code", None)
    if code == "UNAUTHENTICATED":
        return 401
    if code == "PERMISSION_DENIED":
        return 403
    status = getattr(getattr(e, "response", None), "status_code", None)
    return status if status in (401, 403) else None


class AccessDenied(ConfigError):
    """The tracking server refused this identity: one `error:` line naming the permission it lacks, exit 2."""


def access_denied(e: BaseException, permission: str, resource: str, grant: str | None = None) -> AccessDenied:
    """The message for a 401/403: who, which permission on what, where, and how to get it (a 401 with an empty
    `permission`: just "not authenticated")."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    where = display_uri()
    if auth_status(e) == 401:
        how = (f"check MLFLOW_TRACKING_PASSWORD of user {user!r}" if user else
               "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
        need = f"; this needs {permission} permission on {resource}" if permission else ""
        return AccessDenied(f"MLflow server {where} did not accept the credentials (401 unauthenticated): {how}{need}")
    fix = f": an admin can grant it with `finetune access grant --user {user or 'USER'} {grant} --permission {permission}`" if grant else ""
    return AccessDenied(f"MLflow user {user or '(anonymous)'!r} lacks {permission} permission on {resource} at {where} "
                        f"(403 permission denied){fix}")


@contextlib.contextmanager
def requires(permission: str, resource: str, grant: str | None = None) -> Iterator[None]:
    """Turns a 401/403 from the tracking server inside the block into AccessDenied naming `permission` on
    `resource` (e.g. "EDIT", "registered model 'm'"); `grant` is the `finetune access grant` selector
    (e.g. "--registered-model m")."""
    try:
        yield
    except AccessDenied:
        raise
    except Exception as e:
        if auth_status(e):
            raise access_denied(e, permission, resource, grant) from None
        raise


def on_model(name: str, permission: str):
    return requires(permission, f"registered model {name!r}", f"--registered-model {name}")


def on_experiment(name: str, permission: str):
    return requires(permission, f"experiment {name!r}", f"--experiment {name}")


def on_run(run_id: str, permission: str = "EDIT"):
    return requires(permission, f"the experiment of MLflow run {run_id}")


def configure() -> str:
    """Point MLflow (process-wide) at the resolved store; sqlite waits for concurrent writers instead of failing."""
    import mlflow

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        _prepare_sqlite(uri)
    mlflow.set_tracking_uri(uri)
    # The registry lives in the same store. (Not set_registry_uri: it exports MLFLOW_REGISTRY_URI, which would pin
    # the registry to the first store this process used.)
    return uri


@functools.lru_cache(maxsize=None)
def _prepare_sqlite(uri: str) -> None:
    """Once per store and process: create its folder and switch it to WAL, which lets readers and one writer
    work at once (the URI's busy timeout makes a second writer wait)."""
    import sqlite3

    path = _sqlite_path(uri)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        con = sqlite3.connect(path, timeout=30)
        con.execute("PRAGMA journal_mode=WAL")
        con.close()
    except sqlite3.Error as e:  # pragma: no cover - a read-only location is reported by MLflow itself
        log.warning("could not enable WAL on %s: %s", path, e)


def client():
    from mlflow import MlflowClient

    uri = configure()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_tracking_server(timeout: float = 5.0) -> str:
    """Fail fast, before any training, when MLFLOW_TRACKING_URI points at a server that does not answer (or that
    requires credentials this process does not have)."""
    uri = check_remote(timeout)
    configure()
    return uri


def check_remote(timeout: float = 5.0) -> str:
    """check_tracking_server without touching a local store: for the CLI, before Prefect starts."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            r = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
            r.raise_for_status()
        except Exception as e:
            raise ConfigError(
                f"MLflow tracking server {redact_uri(uri)} is unreachable ({type(e).__name__}): start it "
                "(see mlflow/README.md), fix MLFLOW_TRACKING_URI, or unset it to use the local sqlite store"
            ) from None
        check_credentials(timeout)
    return uri


def check_credentials(timeout: float = 10.0) -> None:
    """With a server that requires authentication (MLflow's basic-auth app answers 401), fail fast when the
    credentials (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, read by MLflow itself) are missing or wrong.
    One cheap authenticated read through MLflow's own REST client, so it sends exactly what training will."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    uri = tracking_uri()
    try:
        r = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                         params={"max_results": 1}, timeout=timeout, max_retries=0)
    except Exception:
        return  # a transport problem: the calls that follow report (and retry) it
    if r.status_code == 401:
        class _E(Exception):
            error_code = "UNAUTHENTICATED"

        raise access_denied(_E(), "", "")


def _retry(fn, *args, attempts: int | None = None, **kwargs):
    """Retries with exponential backoff (1, 2, 4 ... 30 s), about 2 minutes in all by default
    (FINETUNE_MLFLOW_RETRY_SECONDS): a restarted tracking server gets the metrics once it is back."""
    import tenacity

    budget = float(os.environ.get("FINETUNE_MLFLOW_RETRY_SECONDS", "120"))
    stop = tenacity.stop_after_delay(budget)
    if attempts is not None:
        stop = stop | tenacity.stop_after_attempt(attempts)

    def warn(state: tenacity.RetryCallState) -> None:
        log.warning("MLflow call %s failed (%s); retrying in %.0f s", getattr(fn, "__name__", fn),
                    redact_uri(state.outcome.exception()), state.next_action.sleep)

    retrying = tenacity.Retrying(
        # a refusal (401/403) is an answer, not an outage: retrying it for minutes helps nobody
        retry=tenacity.retry_if_exception(lambda e: isinstance(e, Exception) and not auth_status(e)),
        wait=tenacity.wait_exponential(multiplier=1, min=1, max=30),
        stop=stop, before_sleep=warn, reraise=True,
    )
    return retrying(fn, *args, **kwargs)


def _experiment_id(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if tracking_uri().startswith("sqlite:///"):
        artifact_location = (STORE_DIR / "artifacts" / name).resolve().as_uri()
    try:
        return c.create_experiment(name, artifact_location=artifact_location)
    except Exception as e:  # created concurrently by another run
        if auth_status(e):
            raise
        return c.get_experiment_by_name(name).experiment_id


def start_run(experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> str:
    """Creates the run (status RUNNING) and logs the whole resolved config as params; returns the run id."""
    from mlflow.entities import Param

    c = client()
    with on_experiment(experiment, "EDIT"):
        run = c.create_run(_experiment_id(c, experiment), run_name=run_name,
                           tags={k: redact_uri(v) for k, v in (tags or {}).items()})
        # no credential in a param: a URI with user:password@ (a dataset URL, say) is recorded redacted
        items = [Param(k, redact_uri(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            _retry(c.log_batch, run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def find_unfinished_run(experiment: str, tag: str, value: str) -> str | None:
    """The newest run with `tag=value` that did not finish (FAILED, KILLED or still RUNNING after a crash):
    `--resume` continues it instead of starting a duplicate."""
    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], f"tags.`{tag}` = '{value}'", max_results=20, order_by=["start_time DESC"])
    for r in runs:
        if r.info.status != "FINISHED":
            return r.info.run_id
        return None  # the newest matching run finished: nothing to resume
    return None


class MetricsLogger:
    """`on_metrics` callback for training: one point per metric per epoch (`step=epoch`), retried with backoff.
    Idempotent per (metric, step): a resumed run replays its history and only the missing points are logged."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._client = client()
        run = _retry(self._client.get_run, run_id)
        self._logged = {
            (k, m.step) for k in run.data.metrics for m in _retry(self._client.get_metric_history, run_id, k)
        }

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and (k, step) not in self._logged
        ]
        if batch:
            with on_run(self.run_id):
                _retry(self._client.log_batch, self.run_id, metrics=batch)
            self._logged.update((m.key, step) for m in batch)


def log_artifacts(run_id: str, paths: Iterable[str], artifact_path: str | None = None) -> None:
    c = client()
    with on_run(run_id):
        for p in paths:
            _retry(c.log_artifact, run_id, p, artifact_path)


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    c = client()
    with on_run(run_id):
        for k, v in tags.items():
            _retry(c.set_tag, run_id, k, redact_uri(v))


def log_params_once(run_id: str, params: dict[str, Any]) -> None:
    """Params not logged yet (a resumed run already has them; MLflow refuses to change a param)."""
    c = client()
    with on_run(run_id):
        logged = c.get_run(run_id).data.params
        for k, v in params.items():
            if k not in logged and v is not None:
                _retry(c.log_param, run_id, k, redact_uri(v))


def log_device(run_id: str, device: str) -> None:
    """The device as a param (compare runs by hardware) and a tag; a resumed run keeps its first param value."""
    log_params_once(run_id, {"device": device})
    set_tags(run_id, {"device": device})


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """FINISHED only on success; FAILED on an exception; KILLED on SIGTERM or cancellation."""
    with on_run(run_id):
        _retry(client().set_terminated, run_id, status, attempts=5)


# Explicit requirements: the inferred ones pull in torchvision (and fail to import without it).
def pip_requirements() -> list[str]:
    from importlib.metadata import version

    reqs = []
    for pkg in ("torch", "transformers", "tokenizers", "accelerate", "mlflow"):
        try:
            v = version(pkg).split("+")[0]
            reqs.append(f"{pkg}=={v}")
        except Exception:
            pass
    return reqs


def log_model(run_id: str, model_dir: str, hf_task: str, input_example: Any = None) -> str:
    """Logs a saved full model dir with MLflow's transformers flavor; returns the logged model's URI. Any model dir,
    a LoRA one too (logged as its adapter plus a reference to its base): `tasks.adapters.log_model`, which comes
    here for a full model."""
    # mlflow.transformers and transformers pull in torch: loaded when a model is logged, not at import
    import mlflow
    from transformers import pipeline

    if (Path(model_dir) / "adapter_config.json").is_file():
        raise ValueError(f"{model_dir} holds a LoRA adapter: log it with tasks.adapters.log_model")
    configure()
    with on_run(run_id):
        # MLflow files a logged model under the *active* experiment (else "Default"), not the run's: point it there.
        mlflow.set_experiment(experiment_id=client().get_run(run_id).info.experiment_id)
        # A pipeline rather than the checkpoint path: MLflow's path-based flavor config breaks on transformers 5.
        pipe = pipeline(hf_task, model=model_dir, tokenizer=model_dir, device="cpu")
        serving = serving_options(model_dir)  # a classifier kind's: model_config, metadata, a pair signature
        if hf_task == "text-classification":  # pyfunc and `mlflow models serve` truncate a long text at the
            # model's limit, instead of failing on a text past the position embeddings (the pipeline's default)
            serving["model_config"] = {"truncation": True, "max_length": input_limit(pipe.tokenizer, pipe.model.config),
                                       **serving.get("model_config", {})}
        input_example = serving.pop("input_example", input_example)
        # save_pretrained: the run holds the pipeline's own save_pretrained output (safetensors weights, nothing
        # pickled); loading it back reads safetensors
        info = _retry(
            mlflow.transformers.log_model,
            transformers_model=pipe,
            task=hf_task,
            name="model",
            run_id=run_id,
            pip_requirements=pip_requirements(),
            input_example=input_example,
            save_pretrained=True,
            attempts=3,
            **serving,
        )
    return info.model_uri


def serving_options(model_dir: str) -> dict:
    """What a classifier's kind adds to the logged model (tasks/kinds/: multi-label pyfunc returns every label's
    score; metadata records the problem, threshold and pairs; a pair model's signature and input example); {} for
    MLM and single-text single-label models."""
    return kinds.serving(str(model_dir))

