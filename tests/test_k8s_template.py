"""The Kubernetes GPU work-pool template (deployments/k8s/gpu-base-job-template.json) and the GPU pool's
job_variables in deployments/prefect.yaml, checked with Prefect's own code, no cluster: the template passes the
server's base-job-template validation and keeps every variable of Prefect's default Kubernetes template; the
job_variables validate against its variables schema (what the server does when a deployment is created); and the
worker's rendering (BaseJobConfiguration.from_template_and_values) puts the GPU limit, node selector, tolerations
and /dev/shm into the Job manifest. One slow test takes both to a real `prefect server` (pool + deploy). No
cluster: docs/scale.md says what this does and does not prove."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deployments" / "k8s" / "gpu-base-job-template.json"


def template() -> dict:
    return json.loads(TEMPLATE.read_text())


def gpu_job_variables() -> dict:
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    return spec["definitions"]["work_pools"]["kubernetes_gpu"]["job_variables"]


def test_template_is_valid_and_extends_prefects_default():
    import prefect.server.api.collections_data as data
    from prefect.server.schemas.actions import validate_base_job_template

    t = template()
    validate_base_job_template(t)  # every {{ placeholder }} is a declared variable
    metadata = json.loads((Path(data.__path__[0]) / "views" / "aggregate-worker-metadata.json").read_text())
    default = metadata["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"]
    assert set(default["variables"]["properties"]) <= set(t["variables"]["properties"])
    assert set(default["job_configuration"]) == set(t["job_configuration"])


def test_prefect_yaml_gpu_job_variables_validate_against_the_template():
    from prefect.utilities.schema_tools import validate

    jv = gpu_job_variables()
    validate(jv, template()["variables"], raise_on_error=True, preprocess=True, ignore_required=True,
             allow_none_with_default=True)
    bad = {**jv, "gpu_count": "two"}
    try:
        validate(bad, template()["variables"], raise_on_error=True, preprocess=True, ignore_required=True)
    except Exception as e:
        assert "gpu_count" in str(e) or "two" in str(e)
    else:
        raise AssertionError("a non-integer gpu_count validated")


def test_worker_renders_gpu_resources_into_the_job_manifest():
    """The worker's rendering steps (BaseJobConfiguration.from_template_and_values without its block/variable
    lookups, which need a server): the variables' defaults, overlaid with the job_variables, applied to the
    template."""
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    t = template()
    values = BaseJobConfiguration._get_base_config_defaults(t["variables"]["properties"])
    values.update(gpu_job_variables())
    cfg = apply_values(template=t["job_configuration"], values=values)
    pod = cfg["job_manifest"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == gpu_job_variables()["image"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"] == {"cpu": "8", "memory": "32Gi"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert c["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert cfg["env"]["MLFLOW_TRACKING_URI"].startswith("http://mlflow.")


@pytest.mark.integration
@pytest.mark.slow
def test_real_prefect_server_takes_the_pool_and_a_gpu_deployment(tmp_path):
    """A real `prefect server`: `prefect work-pool create --type kubernetes --base-job-template` with this
    template (the server validates it; no Kubernetes worker needed for that), then `prefect deploy` of the classify
    deployment moved onto `*k8s_gpu_pool`: the server keeps its job_variables. (No cluster runs it.)"""
    import subprocess

    from tests.integration._servers import VENV_BIN, api, clean_env
    from tests.servers import prefect_server

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    dep = next(d for d in spec["deployments"] if d["name"] == "retrain-classify")
    spec["deployments"] = [{**dep, "work_pool": spec["definitions"]["work_pools"]["kubernetes_gpu"], "schedules": []}]
    prefect_file = tmp_path / "prefect-gpu.yaml"
    prefect_file.write_text(yaml.safe_dump(spec))
    with prefect_server(tmp_path / "home",
                        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp_path / 'p.db'}") as url:
        env = clean_env(PREFECT_API_URL=url, PREFECT_HOME=str(tmp_path / "client"))
        prefect = str(VENV_BIN / "prefect")
        for cmd in ([prefect, "work-pool", "create", "finetune-gpu", "--type", "kubernetes",
                     "--base-job-template", str(TEMPLATE)],
                    [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)]):
            p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        pool = api("GET", f"{url}/work_pools/finetune-gpu")
        assert pool["type"] == "kubernetes" and pool["base_job_template"] == template()
        d = api("GET", f"{url}/deployments/name/classify-finetune/retrain-classify")
        assert d["work_pool_name"] == "finetune-gpu" and d["job_variables"] == gpu_job_variables()
