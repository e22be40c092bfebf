"""Tokenize a prepared dataset with the model's tokenizer (truncation, attention masks, token type ids) and save
it; also the cheap model checks that must fail before any expensive work."""
from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks.common import ConfigError
from tasks.common import atomic_dir, prepared_cache_policy, resolve_model, stable_hash


def check_model(model: str, max_length: int, masked_lm: bool = False) -> dict:
    """Loads only the model's config and tokenizer: unknown model, max_length above the position limit, or a
    model that cannot do masked LM are reported here, before data work and training."""
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model(model)
    try:
        config = AutoConfig.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ConfigError(
            f"could not load model {model!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "Pass a Hub id reachable from here or a local checkpoint directory (with config.json and a tokenizer)."
        ) from None
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and config.model_type in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2  # RoBERTa-style position ids start after the padding index
    problems = []
    if limit is not None and max_length > limit:
        problems.append(f"max_length={max_length} exceeds {model!r}'s position limit of {limit}: pass --max-length {limit} or less")
    has_mlm_head = None
    if masked_lm:
        if tok.mask_token is None:
            problems.append(f"model {model!r} has no mask token, so it cannot be a masked LM: use a BERT/RoBERTa-style model")
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        if config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            problems.append(f"model type {config.model_type!r} has no masked-LM head class: use a BERT/RoBERTa-style model")
        arch = " ".join(config.architectures or [])
        has_mlm_head = any(s in arch for s in ("MaskedLM", "ForPreTraining"))
    if problems:
        raise ConfigError(problems)
    return {
        "path": path,
        "model_type": config.model_type,
        "max_position_embeddings": limit,
        "vocab_size": getattr(config, "vocab_size", None),
        "mask_token": tok.mask_token,
        "has_mlm_head": has_mlm_head,
    }


def tokenize_dataset(data_path: str, model: str, max_length: int, pad_to_max_length: bool = False) -> str:
    """Plain function: text columns removed, `label` -> `labels`, torch format; saved next to the data."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    out = Path(data_path).parent.parent / "tokenized" / stable_hash(data_path, model, max_length, pad_to_max_length, "v1")
    if (out / "dataset_dict.json").exists():
        return str(out)
    tok = AutoTokenizer.from_pretrained(resolve_model(model))
    dd = load_from_disk(data_path)

    def encode(batch):
        return tok(
            batch["text"],
            truncation=True,
            max_length=max_length,
            padding="max_length" if pad_to_max_length else False,
            return_token_type_ids=True,
        )

    dd = dd.map(encode, batched=True, remove_columns=["text"], desc="tokenize")
    if "label" in dd["train"].column_names:
        dd = dd.rename_column("label", "labels")
    with atomic_dir(out) as tmp:
        dd.save_to_disk(str(tmp))
    return str(out)


def tokenize_job(data_path: str, model: str, spec) -> str:
    """The job's own tokenize step (its recipe's): returns the tokenized dataset dir."""
    return spec.recipe.tokenize(data_path, model, spec)


tokenize_job_task = task(tokenize_job, name="tokenize", cache_policy=prepared_cache_policy(), persist_result=True)
