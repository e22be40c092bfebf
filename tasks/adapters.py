"""LoRA adapters (PEFT) for both jobs and both engines, and their MLflow form: the adapter plus a reference to
its base.

Model dir of a LoRA run (`save_model`):
    adapter_config.json, adapter_model.safetensors   LoRA matrices + the `modules_to_save` copies (new head)
    tokenizer files
    base/config.json                                  the *task* model's config (num_labels, id2label, class)
    base/model.safetensors -> <base checkpoint>       symlinks to the base weights (copied where links fail)

Why a `base/` dir and not the base checkpoint itself: the base checkpoint (e.g. the bundled MiniLM, a
`BertModel`) knows nothing of the task's labels. Loaded from it, a classifier gets 2 labels named LABEL_0/1, and
an adapter trained for 3 labels fails to load (size mismatch). `base/` = base weights + task config fixes both.

MLflow (`log_model`) stores the adapter and tokenizer only, with `base_model_path` = a content-named copy of
`base/` beside the local MLflow store (`shared_base_dir`; FINETUNE_LORA_BASES overrides), so that deleting a run's
output dir does not break its registered model: the
transformers flavor records it as `local_base_model_path` (no Hub lookup, no model card fetch: works offline)
and at load time runs `<ModelClass>.from_pretrained(<that path>)` then `PeftModel.from_pretrained(base, peft/)`.
So the logged model loads only where that absolute path (and the symlinks' targets) exist.
`mlflow.transformers.load_model(uri, base_model_path=DIR)` can point elsewhere (a copy of `base/`);
`mlflow.pyfunc.load_model` has no such override. For a self-contained model use `log_model(..., merge=True)`.

Do NOT log a PeftModel through MLflow 3.17 without `base_model_path` when the base is a local dir: MLflow then
saves `get_base_model()` -- the base *with LoRA layers injected* (keys `...query.base_layer.weight`) -- and at
load the plain class misses `...query.weight`, re-initialises it at random and loads "fine" (silent garbage).
`mlflow.transformers.persist_pretrained_model` goes through the same save. With a Hub id as base and no
`base_model_path`, MLflow asks the Hub for the commit hash at log time (fails offline).
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tasks import tracking
from tasks.common import ConfigError, atomic_dir, run_logger

TASKS = ("text-classification", "fill-mask")
# the record `tasks.training.prepare.mark_new_weights` leaves on a model of the weights its checkpoint did not ship
# (a new head): `new_modules` saves them beside the adapter, the optimizer scales their learning rate
NEW_WEIGHTS = "_finetune_new_weights"
NEW_WEIGHT_NAMES = "_finetune_new_weight_names"  # the same record by name, as loaded (before any adapter)
BASE_DIR = "base"
ADAPTER_CONFIG = "adapter_config.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")

def new_modules(model) -> tuple[list[str], list[str]]:
    """(modules, leftover): the outermost modules all of whose weights the checkpoint did not ship (the record of
    `tasks.training.mark_new_weights`: a new classifier, pooler or MLM-head transform, whatever the family calls
    it), and the names of new weights outside any such module.

    Under LoRA these modules are trained in full and saved with the adapter (`modules_to_save`): anything
    `from_pretrained` initialises at random must travel with it, or the model rebuilt at load time differs from
    the trained one. A module that also holds shipped weights is not taken whole: the MLM decoder, whose weight is
    tied to the word embeddings (a copy would put a second embedding matrix in every adapter and train it apart
    from the embeddings). Its new bias is left frozen: transformers initialises it to zeros, the same at every load
    (why the mlm recipe's unigram bias init is skipped under LoRA)."""
    new = getattr(model, NEW_WEIGHTS, set())
    if not new:
        return [], []
    chosen: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(c + ".") for c in chosen):
            continue
        ids = {id(p) for p in module.parameters()}
        if ids and ids <= new:
            chosen.append(name)
    covered = {id(p) for c in chosen for p in model.get_submodule(c).parameters()}
    leftover = [n for n, p in model.named_parameters() if id(p) in new and id(p) not in covered]
    return chosen, leftover


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"LoRA task must be one of {TASKS}, not {task!r}")


def linear_names(model) -> list[str]:
    """The distinct last names of the model's Linear layers (its encoder's projections: LoRA target candidates)."""
    import torch

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names)


ALL_LINEAR = "all-linear"


def lora_targets(model_type: str, target_modules: list[str] | None, modules: list[str],
                 candidates) -> list[str] | str | None:
    """The LoRA target modules: `target_modules` when given, else peft's own per-architecture default
    (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`: None lets peft pick it), else, for an architecture the
    mapping does not know (peft 0.21: DistilBERT, ModernBERT), peft's `"all-linear"`: every linear layer but the
    output head (and but the modules saved whole, which peft never adapts). A ConfigError naming the fix when a
    given name matches no module of the model (`modules`: its module names; `candidates()`: the names to
    suggest)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if not target_modules:
        return None if DEFAULTS.get(model_type) is not None else ALL_LINEAR
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in modules)]
    if missing:
        raise ConfigError(
            f"--lora-target-modules {','.join(missing)}: no module of that name in this {model_type} model; its "
            f"linear layers are {', '.join(candidates())}")
    return list(target_modules)


def targets_used(model) -> list[str]:
    """The distinct last names of the modules a PeftModel carries LoRA layers on (what peft resolved its default
    or "all-linear" to), sorted."""
    from peft.tuners.lora import LoraLayer

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)})


def apply_lora(
    model,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.1,
    target_modules: list[str] | None = None,
    task: str = "text-classification",
    modules_to_save: list[str] | None = None,
):
    """Wraps `model` (loaded with `from_pretrained`, so the base checkpoint is known) in LoRA; returns the
    PeftModel, with only the LoRA matrices and the new modules (see `new_modules`) trainable.

    text-classification -> task_type SEQ_CLS (PeftModelForSequenceClassification: the classifier head is in
    modules_to_save). fill-mask -> no task_type (PEFT has no masked-LM type; a plain PeftModel forwards every
    argument, `labels` included, to the MaskedLM model). `target_modules=None` takes PEFT's default for the
    architecture (see `lora_targets`). `modules_to_save` replaces the `new_modules` default."""
    from peft import LoraConfig, TaskType, get_peft_model

    _check_task(task)
    if not model.name_or_path:
        raise ValueError("LoRA needs a model loaded with from_pretrained: its base checkpoint is referenced")
    target_modules = lora_targets(model.config.model_type, target_modules, [n for n, _ in model.named_modules()],
                                  lambda: linear_names(model))
    log = run_logger(__name__)
    if modules_to_save is None:
        modules_to_save, leftover = new_modules(model)
        if leftover:
            log.info("LoRA: new weights left frozen at their initial values (not in a module of new weights only): "
                     "%s", ", ".join(leftover))
    cfg = LoraConfig(
        task_type=TaskType.SEQ_CLS if task == "text-classification" else None,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save or None,
    )
    peft_model = get_peft_model(model, cfg)
    if target_modules == ALL_LINEAR:
        log.warning("LoRA: peft has no default target modules for model type %r; adapting all its linear layers "
                    "but the output head (peft's all-linear): %s (--lora-target-modules picks others)",
                    model.config.model_type, ",".join(targets_used(peft_model)))
    return peft_model


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once. For a PeftModel the total includes the
    LoRA matrices and the frozen originals of modules_to_save."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def is_adapter_dir(model_dir: str | Path) -> bool:
    """True for a model dir written by `save_model` for a PeftModel."""
    return (Path(model_dir) / ADAPTER_CONFIG).is_file()


def base_checkpoint_dir(name_or_path: str) -> Path:
    """The local dir holding the base weights: the path itself, or the cached Hub snapshot of a repo id
    (never downloads)."""
    if os.path.isdir(name_or_path):
        return Path(name_or_path).resolve()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, local_files_only=True))


def write_base_dir(model, out_dir: str | Path) -> Path:
    """`out_dir/base`: the task model's config plus links to the base checkpoint's weight files."""
    base_model = model.get_base_model()
    src = base_checkpoint_dir(model.peft_config[model.active_adapter].base_model_name_or_path)
    dst = Path(out_dir) / BASE_DIR
    dst.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(base_model.config)
    cfg.architectures = [type(base_model).__name__]
    cfg.save_pretrained(dst)
    weights = [f for f in src.iterdir() if f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.startswith("adapter_")]
    if not weights:
        raise FileNotFoundError(f"no weight files in the base checkpoint {src}")
    for f in weights:
        target = f.resolve()
        try:
            (dst / f.name).symlink_to(target)
        except OSError:  # no symlinks on this filesystem
            shutil.copy2(target, dst / f.name)
    return dst


def shared_base_dir(base_dir: Path) -> Path:
    """A copy of a model dir's `base/` (config + weight links) beside the local MLflow store, named by its content:
    the registered model references this path, which outlives the run's output dir (cleaned up between runs) and is
    shared by every version trained on the same base and labels."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(base_dir.iterdir()):
        h.update(f.name.encode() + (str(f.resolve()) if f.is_symlink() else f.read_bytes().hex()).encode())
    final = Path(os.environ.get("FINETUNE_LORA_BASES", tracking.STORE_DIR / "lora-bases")) / h.hexdigest()[:16]
    if not (final / "config.json").exists():
        with atomic_dir(final, replace=False) as tmp:
            for f in base_dir.iterdir():
                if f.is_symlink():
                    (Path(tmp) / f.name).symlink_to(f.resolve())
                else:
                    shutil.copy2(f, Path(tmp) / f.name)
    return final.resolve()


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """Writes a model dir. A PeftModel: adapter + tokenizer + `base/` (see the module doc); any other model:
    plain save_pretrained + tokenizer, as before."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if is_peft(model):
        write_base_dir(model, out)
    return out


def _auto_class(task: str):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    _check_task(task)
    return AutoModelForSequenceClassification if task == "text-classification" else AutoModelForMaskedLM


def load_model(model_dir: str | Path, task: str, is_trainable: bool = False):
    """A model dir from `save_model` back as a PeftModel (base from `base/`, then the adapter)."""
    from peft import PeftModel

    base = _auto_class(task).from_pretrained(Path(model_dir) / BASE_DIR, use_safetensors=True)
    return PeftModel.from_pretrained(base, str(model_dir), is_trainable=is_trainable)


def model_state(model) -> dict[str, Any]:
    """What a plain-loop checkpoint needs of the model: for a PeftModel only the adapter (LoRA + head), else
    the full state_dict. (A PeftModel's full state_dict also round-trips into a freshly wrapped model, but it
    carries the frozen base every time.)"""
    if is_peft(model):
        from peft import get_peft_model_state_dict

        return {"peft_adapter": get_peft_model_state_dict(model)}
    return model.state_dict()


def load_model_state(model, state: dict[str, Any]) -> None:
    """Inverse of `model_state`, into a model built the same way (same base, same `apply_lora` arguments)."""
    if "peft_adapter" in state:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state["peft_adapter"])
        if result.unexpected_keys:
            raise ValueError(f"adapter checkpoint does not fit this model: {result.unexpected_keys[:5]}")
    else:
        model.load_state_dict(state)


def requirements_with_peft(base: list[str] | None = None) -> list[str]:
    """`base` (default: the project's pinned requirements) plus peft. Explicit, because MLflow's inferred
    requirements add torchvision."""
    from importlib.metadata import version

    reqs = list(base if base is not None else tracking.pip_requirements())
    if not any(r.split("=")[0].strip().lower() == "peft" for r in reqs):
        reqs.append(f"peft=={version('peft')}")
    return reqs


def _pipeline(hf_task: str, model, tokenizer):
    from transformers import pipeline

    # transformers logs an error that PeftModel "is not supported" for the task; the pipeline works regardless.
    tlog = logging.getLogger("transformers.pipelines.base")
    level = tlog.level
    tlog.setLevel(logging.CRITICAL)
    try:
        return pipeline(hf_task, model=model, tokenizer=tokenizer, device="cpu")
    finally:
        tlog.setLevel(level)


def load_pipeline(model_dir: str | Path, hf_task: str):
    """A CPU pipeline from any model dir. Use it instead of `pipeline(task, model=model_dir)` for LoRA dirs:
    transformers then builds the base from adapter_config's `base_model_name_or_path` (the raw base checkpoint,
    without the task config) -- for a classifier that fails (KeyError on the label) or loses the labels."""
    if not is_adapter_dir(model_dir):
        return _pipeline(hf_task, str(model_dir), str(model_dir))
    from transformers import AutoTokenizer

    return _pipeline(hf_task, load_model(model_dir, hf_task), AutoTokenizer.from_pretrained(model_dir))


def log_model(
    run_id: str,
    model_dir: str | Path,
    hf_task: str,
    input_example: Any = None,
    pip_requirements: list[str] | None = None,
    merge: bool = False,
) -> str:
    """Logs a LoRA model dir with MLflow's transformers flavor under `run_id`; returns the model URI.

    Default: adapter + tokenizer only (a few hundred KB to a few MB), base referenced by the absolute path of
    `model_dir/base` (needed wherever the model is loaded). Records the modules that carry LoRA layers as the run
    param `lora.target_modules_used`. `merge=True`: LoRA merged into the base weights and
    logged as an ordinary full model (self-contained, no peft needed at load, full size).
    A dir without an adapter goes to `tasks.tracking.log_model` unchanged."""
    import mlflow
    from transformers import AutoTokenizer

    if not is_adapter_dir(model_dir):
        return tracking.log_model(run_id, str(model_dir), hf_task, input_example)
    model_dir = Path(model_dir).resolve()
    model = load_model(model_dir, hf_task)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tracking.configure()
    # what peft's default or "all-linear" resolved to (the config's lora.target_modules is null then)
    tracking.log_params_once(run_id, {"lora.target_modules_used": ",".join(targets_used(model))})
    # MLflow files a logged model under the *active* experiment (else "Default"), not the run's.
    mlflow.set_experiment(experiment_id=tracking.client().get_run(run_id).info.experiment_id)
    serving = tracking.serving_options(str(model_dir))
    common = dict(task=hf_task, name="model", run_id=run_id, input_example=serving.pop("input_example", input_example),
                  **serving)
    if merge:
        with tempfile.TemporaryDirectory(prefix="merged-") as tmp:
            merged = model.merge_and_unload()
            merged.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            pipe = _pipeline(hf_task, tmp, tmp)  # name_or_path is a local dir: MLflow saves the weights
            reqs = list(pip_requirements) if pip_requirements is not None else tracking.pip_requirements()
            info = mlflow.transformers.log_model(transformers_model=pipe, pip_requirements=reqs, **common)
    else:
        info = mlflow.transformers.log_model(
            transformers_model=_pipeline(hf_task, model, tok),
            base_model_path=str(shared_base_dir(model_dir / BASE_DIR)),
            pip_requirements=requirements_with_peft(pip_requirements),
            **common,
        )
    return info.model_uri
