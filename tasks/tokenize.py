"""Tokenize a prepared dataset with the model's tokenizer (truncation, attention masks, token type ids where the model
takes them) and save it; also the cheap model checks that must fail before any expensive work.

Family-agnostic: what a batch carries, the position limit and the mask token come from the tokenizer
(`model_input_names`), the config and the model class's forward signature, never from a family's name."""
from __future__ import annotations

from pathlib import Path

from tasks.common import ConfigError
from tasks.base_model import resolve_model
from tasks.common import atomic_dir, model_class, position_limit, stable_hash


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
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    if config.model_type not in MODEL_MAPPING_NAMES:
        raise ConfigError(
            f"model {model!r} is of type {config.model_type!r}, which transformers {_tf_version()} has no model "
            "class for: pick an encoder checkpoint (BERT, RoBERTa, XLM-R, DistilBERT, ELECTRA, DeBERTa-v2/v3, "
            "ModernBERT...) or upgrade transformers")
    limit = position_limit(config)
    problems = []
    if limit is not None and max_length > limit:
        problems.append(f"max_length={max_length} exceeds {model!r}'s position limit of {limit}: pass --max-length {limit} or less")
    has_mlm_head = None
    if masked_lm:
        if tok.mask_token is None:
            problems.append(f"model {model!r}'s tokenizer has no mask token, so it cannot be a masked LM: use an "
                            "encoder checkpoint trained with masked LM (BERT, RoBERTa, DeBERTa, ModernBERT...)")
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        if config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            problems.append(f"model type {config.model_type!r} has no masked-LM head class in transformers "
                            f"{_tf_version()}, so `mlm` cannot add one: use `classify`, or a checkpoint of a family "
                            "with a masked-LM head (BERT, RoBERTa, DistilBERT, ELECTRA, DeBERTa-v2, ModernBERT...)")
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


def _tf_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def forward_takes(config, name: str, auto: str = "AutoModel") -> bool:
    """Whether the model class's `forward` names the input `name` (a `**kwargs` does not count: DistilBERT and
    ModernBERT accept and silently ignore token_type_ids there)."""
    import inspect

    cls = model_class(config, auto)
    return cls is not None and name in inspect.signature(cls.forward).parameters


def batch_inputs(tok, config, auto: str = "AutoModel") -> list[str]:
    """What a batch carries: the tokenizer's `model_input_names` that the model's forward takes."""
    return [n for n in tok.model_input_names if forward_takes(config, n, auto)]


def tokenize_dataset(data_path: str, model: str, max_length: int, pad_to_max_length: bool = False) -> str:
    """Plain function: text columns removed, `label` -> `labels`, torch format; saved next to the data."""
    from datasets import load_from_disk
    from transformers import AutoConfig, AutoTokenizer

    out = Path(data_path).parent.parent / "tokenized" / stable_hash(data_path, model, max_length, pad_to_max_length, "v2")
    if (out / "dataset_dict.json").exists():
        return str(out)
    path = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(path)
    # token_type_ids only for a model that takes them (BERT, ELECTRA, DeBERTa; not RoBERTa, DistilBERT, ModernBERT)
    type_ids = "token_type_ids" in batch_inputs(tok, AutoConfig.from_pretrained(path))
    dd = load_from_disk(data_path)
    # sentence pairs (tasks/kinds/): the tokenizer encodes both texts; `longest_first` trims the longer one first
    pair = "text_pair" in dd["train"].column_names

    def encode(batch):
        return tok(
            batch["text"],
            batch["text_pair"] if pair else None,
            truncation="longest_first",
            max_length=max_length,
            padding="max_length" if pad_to_max_length else False,
            return_token_type_ids=type_ids,
        )

    dd = dd.map(encode, batched=True, remove_columns=["text", *(["text_pair"] if pair else [])], desc="tokenize")
    if "label" in dd["train"].column_names:
        dd = dd.rename_column("label", "labels")
    with atomic_dir(out) as tmp:
        dd.save_to_disk(str(tmp))
    return str(out)


def tokenize_job(data_path: str, model: str, spec) -> str:
    """The job's own tokenize step (its recipe's): returns the tokenized dataset dir."""
    return spec.recipe.tokenize(data_path, model, spec)
