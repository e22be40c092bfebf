"""Masked-LM data: tokenize the prepared texts, pack them into `max_length` blocks (or truncate each), mask the
held-out split once, and save it all to disk; plus the collator that masks training batches on the fly.

Why the eval split is masked here, once: the MLM collator draws new masks every time it is called, so an eval
loss measured with it moves with the dice as well as with the model. Masking the eval blocks once (same seeded
transformers collator, same 15% and 80/10/10 rule) scores every epoch, and both engines, on the very same
positions: epoch-0 and final numbers are directly comparable."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.base_model import resolve_model
from tasks.common import ConfigError, atomic_dir, stable_hash
from tasks.tokenize import batch_inputs

STATS_FILE = "mlm_stats.json"


def mlm_masker(tokenizer, mlm_probability: float, seed: int):
    """transformers' MLM collator: `mlm_probability` of the non-special tokens are chosen; of those 80% become the
    mask token, 10% a random token, 10% stay; labels are -100 everywhere else. Seeded, so runs repeat."""
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability, seed=seed)


@dataclass
class MLMBatchCollator:
    """One collator for both splits. Training rows carry no `labels`: they are masked afresh on every pass by
    `mlm_masker` (special tokens, padding included, are never masked). Held-out rows were masked once by
    `tokenize_for_mlm` and carry their `labels`: they are only padded (labels with -100)."""

    tokenizer: Any
    mlm_probability: float = 0.15
    seed: int = 42
    _masker: Any = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self._masker = mlm_masker(self.tokenizer, self.mlm_probability, self.seed)

    def __call__(self, examples: list[dict]) -> dict:
        if "labels" not in examples[0]:
            return self._masker(examples)
        return pad_premasked(self.tokenizer, examples)


def pad_premasked(tokenizer, examples: list[dict]) -> dict:
    """Pads already-masked rows: inputs by the tokenizer, labels with -100 on the tokenizer's padding side."""
    import torch

    labels = [list(map(int, e["labels"])) for e in examples]
    feats = [{k: v for k, v in e.items() if k not in ("labels", "special_tokens_mask")} for e in examples]
    batch = tokenizer.pad(feats, return_tensors="pt")
    width = batch["input_ids"].shape[1]
    left = tokenizer.padding_side == "left"
    batch["labels"] = torch.tensor(
        [([-100] * (width - len(lab)) + lab) if left else (lab + [-100] * (width - len(lab))) for lab in labels]
    )
    return batch


def _group(batch: dict, block: int) -> dict:
    """Concatenate the texts of a `map` batch and cut them into `block`-token pieces; the tail shorter than a block
    is dropped (standard practice) unless it is all there is, so a tiny corpus still gives one block."""
    concat = {k: [x for row in batch[k] for x in row] for k in batch}
    n = len(concat["input_ids"])
    total = (n // block) * block if n >= block else n
    return {k: [v[i : i + block] for i in range(0, total, block)] for k, v in concat.items()}


def tokenize_for_mlm(
    data_path: str,
    model: str,
    max_length: int,
    group_texts: bool = True,
    mlm_probability: float = 0.15,
    seed: int = 42,
) -> str:
    """Plain function: the prepared DatasetDict (column `text`) -> token blocks saved to disk; returns the path.
    train: input_ids, token_type_ids (when the model takes them), attention_mask, special_tokens_mask (masked later, per batch).
    eval: the same, masked once here, with `labels` (-100 where nothing is to be predicted).
    `mlm_stats.json` beside it holds the counts (blocks, tokens, masked eval tokens)."""
    from datasets import DatasetDict, load_from_disk
    from transformers import AutoConfig, AutoTokenizer

    key = stable_hash(data_path, model, max_length, group_texts, mlm_probability, seed, "mlm-v2")
    out = Path(data_path).parent.parent / "mlm_tokenized" / key
    if (out / "dataset_dict.json").exists() and (out / STATS_FILE).exists():
        return str(out)
    path = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(path)
    type_ids = "token_type_ids" in batch_inputs(tok, AutoConfig.from_pretrained(path), "AutoModelForMaskedLM")
    dd = load_from_disk(data_path)

    # --- tokenize: special tokens kept ([CLS] ... [SEP] per text) and marked, so they are never masked
    def encode(batch):
        return tok(
            batch["text"],
            truncation=not group_texts,
            max_length=None if group_texts else max_length,
            return_special_tokens_mask=True,
            return_token_type_ids=type_ids,  # only for a model that takes them
            verbose=False,  # grouping cuts long texts into blocks: no "longer than the model's maximum" warning
        )

    dd = dd.map(encode, batched=True, remove_columns=dd["train"].column_names, desc="tokenize for MLM")
    if group_texts:
        dd = dd.map(lambda b: _group(b, max_length), batched=True, desc=f"group into {max_length}-token blocks")
    dd = DatasetDict({k: v.filter(lambda b: [len(x) > 0 for x in b["input_ids"]], batched=True) for k, v in dd.items()})
    for k, v in dd.items():
        if len(v) == 0:
            raise ConfigError(f"the {k} split has no tokens after tokenization: check the text column and the data")

    # --- mask the eval split once, with the same seeded transformers collator training uses
    masker = mlm_masker(tok, mlm_probability, seed + 1)

    def mask_once(batch):
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["input_ids"]))]
        out_rows: dict[str, list] = {k: [] for k in batch if k != "special_tokens_mask"}
        out_rows["labels"] = []
        for row in rows:  # one row at a time: no padding to strip afterwards
            masked = masker([row])
            for k in out_rows:
                out_rows[k].append(masked[k][0].tolist())
        return out_rows

    dd["eval"] = dd["eval"].map(
        mask_once, batched=True, remove_columns=["special_tokens_mask"], desc="mask the eval split once"
    )
    masked = sum(sum(1 for x in lab if x != -100) for lab in dd["eval"]["labels"])
    if masked == 0:
        raise ConfigError(
            "the eval split is too small: no token was masked in it. Add eval texts (--eval-samples) or raise "
            "--mlm-probability"
        )
    stats = {
        "train_blocks": len(dd["train"]),
        "eval_blocks": len(dd["eval"]),
        "train_tokens": sum(len(x) for x in dd["train"]["input_ids"]),
        "eval_tokens": sum(len(x) for x in dd["eval"]["input_ids"]),
        "eval_masked_tokens": masked,
        "group_texts": group_texts,
        "max_length": max_length,
    }
    with atomic_dir(out) as tmp:
        dd.save_to_disk(str(tmp))
        (tmp / STATS_FILE).write_text(json.dumps(stats, indent=2))
    return str(out)


def mlm_stats(tokenized_path: str) -> dict:
    return json.loads((Path(tokenized_path) / STATS_FILE).read_text())

