"""Batch scoring with a registered model: a file, a folder or a glob of CSV/TSV/JSONL/Parquet in, one prediction
row per input row out (Parquet by default), in input order.

How it runs (the plain functions; `flows/score.py` wraps them for Prefect, `finetune score` calls them directly):
- the alias is resolved to a version once, at the start: a registry change mid-job does not change the model used;
  the version, its run and URI go into a manifest beside the output parts and into the output's metadata;
- the input streams: the files are read one after the other by pyarrow's streaming readers, never whole, and cut
  into chunks of `chunk_rows` rows: chunk k is rows [k * chunk_rows, (k + 1) * chunk_rows) on every run;
- within a chunk the texts are tokenized once, sorted by length and batched with dynamic padding, each batch at most
  `batch_size` texts and `batch_tokens` padded tokens (`length_batches`: on a CPU long batches spill the cache); the model runs
  under the run's precision (`tasks.device`: bf16 where native; fp32 for a regression model, whose output is the
  number) and is loaded once per process (or per Ray actor);
- each chunk's predictions are written atomically as one part file; `resume` skips the parts already written, and
  the final file is assembled from the parts (each input row exactly once), then the parts are removed;
- on Ray (`workers` / `ray_address`) the same chunk reader and the same scorer run inside Ray Data: a reading task
  yields the chunks, one block each, and `map_batches` with an actor pool scores them (one model load per actor), the driver writes
  the parts. Same chunks, same batches, same code: the same output as the local path, row for row.

Predictions per model kind (one `Head` each; a new kind is one more class in HEADS): single-label classification
`label`, `score`; multi-label (problem_type multi_label_classification) `labels`, `scores` above the threshold
(`threshold`, else the one the model was trained with: `model_threshold`; recorded in the output's metadata);
regression (problem_type regression, or one output) `value`; fill-mask `tokens`, `scores` (top-k per mask, one
list per mask). Every output row also has `row` (its 0-based position in the input) and `skipped`: null, or why
the row got no prediction (empty text, not text, no mask) — such rows are kept and counted, never dropped."""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks import device as dev
from tasks import kinds, output, registry, tracking
from tasks.common import ConfigError, input_limit, write_json_atomic
from tasks.jobs import mlm
from tasks.kinds.multi_label import DEFAULT_THRESHOLD
from tasks.predict import to_model_mask

log = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
SUFFIX = {"csv": ".csv", "tsv": ".tsv", "jsonl": ".jsonl", "parquet": ".parquet"}
META_KEY = b"finetune.score"  # Parquet schema metadata key of the output: the model version and run
MANIFEST = "manifest.json"
SKIP_EMPTY, SKIP_NOT_TEXT, SKIP_NO_MASK = "empty text", "not text", "no mask"
# the driver's columns in a chunk (chunk, global row, rows in the chunk) next to the user's
_CHUNK, _ROW, _N, _NONTEXT = "_chunk", "_row", "_n", "_nontext"


# Default token budgets per forward pass. CPU: MiniLM in bf16 on 2 cores (AVX512-BF16), 1,280 reviews cut to
# 1,000 characters: 80 rows/s at 4,096 tokens, 64 at 64 texts of up to 250 tokens, 51 at one text per pass
# (bench/bench_score.py). GPU: 64 texts of 1,024 tokens; unmeasured here, chosen so that a 512-token model keeps
# its 64-text batches and a long-context one (ModernBERT: 8,192) does not put 500k tokens through one pass.
CPU_BATCH_TOKENS = 4096
GPU_BATCH_TOKENS = 65536


class ScoreConfig(BaseModel):
    """One batch scoring job: the flow's parameter, the deployment's `config`, and `finetune score`'s flags."""

    model_config = ConfigDict(extra="forbid")

    registered_model: str = Field(description="Model Registry name.")
    alias: str | None = Field(None, description="Registry alias (default: champion); not with version.")
    version: int | None = Field(None, description="Registered version; not with alias.")
    input: str = Field(description="CSV/TSV/JSONL/Parquet file, a folder of them, or a glob; {date} and "
                                   "{yesterday} become UTC dates (YYYY-MM-DD).")
    output: str = Field(description="Output file (Parquet unless output_format says otherwise); {date} and "
                                    "{yesterday} as in input.")
    text_column: str = Field("text", description="Column with the text to score.")
    text_pair_column: str | None = Field(None, description="Second text column, for models that take text pairs.")
    id_columns: list[str] = Field(default_factory=list, description="Columns copied to the output unchanged.")
    output_format: Literal["parquet", "csv", "tsv", "jsonl", "input"] = Field(
        "parquet", description="Output format; `input`: the (first) input file's format.")
    chunk_rows: int = Field(10_000, gt=0, description="Rows read, scored and written per chunk (the resume unit).")
    batch_size: int = Field(64, gt=0, description="Texts per forward pass, at most (sorted by length within a chunk).")
    batch_tokens: int | None = Field(None, gt=0, description=(
        "Padded tokens per forward pass, at most (texts x the batch's longest); a longer text runs alone. Default: "
        f"{CPU_BATCH_TOKENS} on the CPU (larger batches spill the cache: slower), {GPU_BATCH_TOKENS} on a GPU."))
    max_length: int | None = Field(None, gt=0, description="Truncate texts to this many tokens (default: the "
                                                           "model's limit).")
    top_k: int = Field(5, gt=0, description="Fill-mask: candidates per mask.")
    threshold: float | None = Field(None, ge=0, le=1, description=(
        "Multi-label: labels whose score is above this. Default: the threshold the model was trained with (recorded "
        "on the logged model, as `finetune predict` uses it; 0.5 for a model that recorded none)."))
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on a GPU or a CPU with native bf16, else fp32 (fp32 for a regression model).")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Where the model runs.")
    resume: bool = Field(False, description="Continue an interrupted job at its first unfinished chunk.")
    workers: int | None = Field(None, gt=0, description="Score on Ray Data with this many actors (a local Ray "
                                                        "unless ray_address is set).")
    ray_address: str | None = Field(None, description="A running Ray cluster (e.g. 127.0.0.1:6379 or "
                                                      "ray://head:10001): score there.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray: CPUs per scoring actor.")
    gpus_per_worker: float = Field(0.0, ge=0, description="Ray: GPUs per scoring actor.")

    @field_validator("input", "output")
    @classmethod
    def _dates(cls, v: str) -> str:
        """`{date}` / `{yesterday}` (UTC, YYYY-MM-DD) in a path: a nightly schedule's fixed parameters name the
        day's files."""
        if "{" not in v:
            return v
        import datetime as dt

        today = dt.datetime.now(dt.timezone.utc).date()
        return v.replace("{date}", today.isoformat()).replace("{yesterday}", (today - dt.timedelta(days=1)).isoformat())

    def model_post_init(self, _: Any) -> None:
        if self.alias is not None and self.version is not None:
            raise ConfigError("alias and version are mutually exclusive: pass one of them (--alias or --version)")

    @property
    def on_ray(self) -> bool:
        return self.workers is not None or self.ray_address is not None


# --- the model: resolved once ---------------------------------------------------------------------------------


@dataclass
class ModelRef:
    name: str
    version: str
    run_id: str | None
    requested: str  # what the user asked for: models:/NAME@ALIAS or models:/NAME/VERSION

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def resolve_model(name: str, alias: str | None = None, version: int | str | None = None) -> ModelRef:
    """The version an alias points to *now* (or the version asked for), checked to exist: one `error:` line
    otherwise, before any data is read or model loaded."""
    requested = registry.model_uri(name, alias, version)
    tracking.configure()
    if version is None:
        alias = alias or registry.CHAMPION
        v = registry.alias_version(name, alias)
        if v is None:
            known = registry.aliases(name)
            hint = (f"its aliases are {', '.join(f'{a} (v{v})' for a, v in known.items())}" if known
                    else "it has no aliases (or is not registered)")
            raise ConfigError(f"registered model {name!r} has no alias {alias!r} at {tracking.display_uri()}: "
                              f"{hint}. Pass --alias or --version of an existing one (finetune compare lists them).")
        version = v
    mv = registry.get_version(name, version)
    if mv is None:
        raise ConfigError(f"registered model {name!r} has no version {version} at {tracking.display_uri()}: "
                          "pass an existing --version (finetune compare lists them).")
    return ModelRef(name=name, version=str(mv.version), run_id=mv.run_id, requested=requested)


# --- the input ------------------------------------------------------------------------------------------------


@dataclass
class InputPlan:
    files: list[Path]
    formats: list[str]
    text_columns: list[str]  # text (and pair) column
    id_columns: list[str]
    rows: list[int] = field(default_factory=list)  # per file, filled by count_rows

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys(self.id_columns + self.text_columns))


def input_files(spec: str) -> list[Path]:
    """A file, a folder (its supported files, sorted) or a glob (sorted)."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in FORMATS)
        if not files:
            raise ConfigError(f"--input folder {spec!r} has no {'/'.join(sorted(set(FORMATS.values())))} files")
        return files
    if p.is_file():
        return [p]
    if glob.has_magic(spec):
        files = sorted(Path(f) for f in glob.glob(spec) if Path(f).is_file())
        if not files:
            raise ConfigError(f"--input {spec!r} matches no files")
        return files
    raise ConfigError(f"--input {spec!r} not found: pass a CSV/TSV/JSONL/Parquet file, a folder or a glob")


def file_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"input {str(path)!r}: unknown format {path.suffix!r}: use .csv, .tsv, .jsonl or .parquet")
    return fmt


def _schema_columns(path: Path, fmt: str) -> tuple[list[str], dict[str, str]]:
    """Column names (and Parquet types) from the file's header/first record/schema, without reading it."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        return schema.names, {n: str(schema.field(n).type) for n in schema.names}
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    if not isinstance(rec, dict):
                        raise ValueError("a JSONL line is not an object")
                    return list(rec), {}
        return [], {}
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f, delimiter="\t" if fmt == "tsv" else ","), [])
    return header, {}


def plan_input(cfg: ScoreConfig) -> InputPlan:
    """Every input file's format and columns checked before any model loads: a missing column or an unreadable
    file is one ConfigError naming the file and the fix."""
    files = input_files(cfg.input)
    text_cols = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    reserved = {"row", "skipped", "label", "score", "labels", "scores", "value", "tokens"}
    clash = sorted(set(cfg.id_columns) & reserved)
    problems = [f"--id-columns {', '.join(clash)}: these names are the output's own columns; rename them in the "
                "input"] if clash else []
    formats = []
    for f in files:
        try:
            fmt = file_format(f)
            formats.append(fmt)
            names, types = _schema_columns(f, fmt)
        except ConfigError as e:
            problems.append(str(e))
            continue
        except Exception as e:  # unreadable: permissions, not UTF-8, corrupt Parquet, bad JSON
            problems.append(f"input {str(f)!r} is unreadable as {FORMATS.get(f.suffix.lower(), 'data')}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Fix or remove the file.")
            continue
        missing = [c for c in text_cols + cfg.id_columns if c not in names]
        if missing:
            flag = {cfg.text_column: "--text-column", cfg.text_pair_column: "--text-pair-column"}
            which = ", ".join(f"{c!r} ({flag.get(c, '--id-columns')})" for c in missing)
            problems.append(f"input {str(f)!r} has no column {which}: its columns are {', '.join(names) or 'none'}")
        for c in text_cols:
            t = types.get(c)
            if t and t not in ("string", "large_string", "string_view", "null"):
                problems.append(f"input {str(f)!r}: column {c!r} is {t}, not text: pass the text column with "
                                "--text-column")
    if problems:
        raise ConfigError(problems)
    return InputPlan(files=files, formats=formats, text_columns=text_cols, id_columns=list(cfg.id_columns))


def _record_batches(path: Path, fmt: str, columns: list[str], text_columns: list[str],
                    block_bytes: int = 1 << 22) -> Iterator[Any]:
    """The file as a stream of pyarrow tables (a few MB each), only `columns`, text columns as strings and a
    `_nontext` flag (JSONL cells that are numbers, lists...). Never the whole file in memory."""
    import pyarrow as pa

    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        for b in pf.iter_batches(batch_size=8192, columns=columns):
            t = pa.Table.from_batches([b])
            yield t.append_column(_NONTEXT, pa.array([False] * len(t)))
    elif fmt in ("csv", "tsv"):
        import pyarrow.csv as pcsv

        reader = pcsv.open_csv(
            path, read_options=pcsv.ReadOptions(block_size=block_bytes),
            parse_options=pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True),
            # every column as the text it is in the file: ids carried through unchanged (leading zeros included)
            convert_options=pcsv.ConvertOptions(include_columns=columns,
                                                column_types={c: pa.string() for c in columns}),
        )
        for b in reader:
            t = pa.Table.from_batches([b])
            yield t.append_column(_NONTEXT, pa.array([False] * len(t)))
    else:  # jsonl: line by line, so one odd cell (a number where text belongs) is a counted row, not a failure
        rows: list[dict] = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                rec = json.loads(line)
                row = {c: rec.get(c) for c in columns}
                nontext = False
                for c in text_columns:
                    if row[c] is not None and not isinstance(row[c], str):
                        row[c], nontext = None, True
                row[_NONTEXT] = nontext
                rows.append(row)
                if len(rows) >= 8192:
                    yield pa.Table.from_pylist(rows)
                    rows = []
        if rows:
            yield pa.Table.from_pylist(rows)


def iter_chunks(plan: InputPlan, chunk_rows: int, skip: set[int] | None = None) -> Iterator[tuple[int, Any]]:
    """(chunk index, table) for each chunk of the input: rows [k * chunk_rows, (k + 1) * chunk_rows) of the files
    read one after the other, so every chunk but the last has exactly `chunk_rows` rows and chunk k is the same
    rows on every run. Chunks in `skip` are read past, not returned (resume). The table carries `_chunk`, `_row`
    (the global input position) and `_n` (rows in the chunk)."""
    import pyarrow as pa

    skip = skip or set()
    buf, ci = None, 0

    def emit(t):
        return ci, _with_position(t.combine_chunks(), ci, ci * chunk_rows)

    for fi, path in enumerate(plan.files):
        for t in _record_batches(path, plan.formats[fi], plan.columns, plan.text_columns):
            try:
                buf = t if buf is None else pa.concat_tables([buf, t], promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise ConfigError(f"input {str(path)!r}: its columns' types differ from the files before it ({e}): "
                                  "score files of one format and schema together") from None
            while len(buf) >= chunk_rows:
                chunk, buf = buf.slice(0, chunk_rows), buf.slice(chunk_rows)
                if ci not in skip:
                    yield emit(chunk)
                ci += 1
    if buf is not None and len(buf) and ci not in skip:
        yield emit(buf)


def _with_position(t, ci: int, start: int):
    import pyarrow as pa

    n = len(t)
    t = t.append_column(_CHUNK, pa.array([ci] * n, pa.int64()))
    return t.append_column(_ROW, pa.array(range(start, start + n), pa.int64())).append_column(
        _N, pa.array([n] * n, pa.int64()))


def count_rows(plan: InputPlan) -> list[int]:
    """Rows per file, streaming (Parquet: from its footer). Gives progress its total and each row its position."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    counts = []
    for f, fmt in zip(plan.files, plan.formats):
        try:
            if fmt == "parquet":
                counts.append(pq.ParquetFile(f).metadata.num_rows)
            else:
                counts.append(sum(len(t) for t in _record_batches(f, fmt, plan.text_columns[:1],
                                                                  plan.text_columns[:1])))
        except (pa.ArrowException, ValueError, OSError) as e:  # a malformed line anywhere: found before scoring
            raise ConfigError(f"input {str(f)!r} is unreadable as {fmt}: {str(e).splitlines()[0]}. Fix the file "
                              "(quote values that contain the delimiter) or remove it.") from None
    plan.rows = counts
    return counts


# --- the model: heads per kind ---------------------------------------------------------------------------------


class Head:
    """Turns a batch's logits into prediction columns. One per model kind; `columns` fixes the output schema."""

    kind = "?"

    def __init__(self, model, tok, cfg: ScoreConfig):
        self.model, self.tok, self.cfg = model, tok, cfg
        self.id2label = {int(k): str(v) for k, v in (getattr(model.config, "id2label", None) or {}).items()}

    def columns(self):  # -> pyarrow schema fields
        raise NotImplementedError

    def prepare(self, text: str) -> tuple[str | None, str | None]:
        """(text to tokenize, None) or (None, skip reason)."""
        return text, None

    def forward(self, batch: dict):
        return self.model(**batch).logits

    def rows(self, out, batch: dict) -> list[dict]:
        raise NotImplementedError


class SingleLabel(Head):
    kind = "classification"

    def columns(self):
        import pyarrow as pa

        return [pa.field("label", pa.string()), pa.field("score", pa.float64())]

    def rows(self, logits, batch):
        probs = logits.float().softmax(-1)
        score, idx = probs.max(-1)
        return [{"label": self.id2label.get(int(i), str(int(i))), "score": float(s)}
                for s, i in zip(score.tolist(), idx.tolist())]


class MultiLabel(Head):
    """Every label whose sigmoid score is above the threshold: `cfg.threshold` (`score` always sets it: the
    user's, or the logged model's), else the model config's own (`finetune_threshold`), else 0.5."""

    kind = "multi-label classification"

    def __init__(self, model, tok, cfg: ScoreConfig):
        super().__init__(model, tok, cfg)
        own = getattr(model.config, "finetune_threshold", None)
        self.threshold = float(cfg.threshold if cfg.threshold is not None else own if own is not None
                               else DEFAULT_THRESHOLD)

    def columns(self):
        import pyarrow as pa

        return [pa.field("labels", pa.list_(pa.string())), pa.field("scores", pa.list_(pa.float64()))]

    def rows(self, logits, batch):
        out = []
        for p in logits.float().sigmoid().tolist():
            hits = sorted((i for i, s in enumerate(p) if s > self.threshold), key=lambda i: -p[i])
            out.append({"labels": [self.id2label.get(i, str(i)) for i in hits], "scores": [float(p[i]) for i in hits]})
        return out


class Regression(Head):
    kind = "regression"

    def columns(self):
        import pyarrow as pa

        return [pa.field("value", pa.float64())]

    def rows(self, logits, batch):
        return [{"value": float(v)} for v in logits.float()[:, 0].tolist()]


class FillMask(Head):
    """Top-k tokens and scores per mask; `[MASK]`/`<mask>` map to the model's own mask token (tasks.predict).
    The prediction head runs on the masked positions only (tasks.jobs.mlm.masked_lm_logits)."""

    kind = "fill-mask"

    def columns(self):
        import pyarrow as pa

        return [pa.field("tokens", pa.list_(pa.list_(pa.string()))), pa.field("scores", pa.list_(pa.list_(pa.float64())))]

    def prepare(self, text):
        try:
            return to_model_mask([text], self.tok.mask_token)[0], None
        except ConfigError:
            return None, SKIP_NO_MASK

    def forward(self, batch):
        ids = batch["input_ids"]
        labels = ids.masked_fill(ids != self.tok.mask_token_id, -100)
        logits, _ = mlm.masked_lm_logits(self.model, {**batch, "labels": labels})
        return logits  # (masks in the batch, vocab), row-major

    def rows(self, logits, batch):
        import torch

        per_row = (batch["input_ids"] == self.tok.mask_token_id).sum(-1).tolist()
        top = torch.topk(logits.float().softmax(-1), k=min(self.cfg.top_k, logits.shape[-1]), dim=-1)
        scores, ids = top.values.tolist(), top.indices.tolist()
        out, m = [], 0
        for n in per_row:  # a mask truncated away leaves the row with no candidates: [] (kept, not skipped)
            out.append({"tokens": [[self.tok.decode([i]).strip() for i in ids[m + j]] for j in range(n)],
                        "scores": [scores[m + j] for j in range(n)]})
            m += n
        return out


def head_class(task: str, config) -> type[Head]:
    """The predictor for a model: its transformers task, then (classification) its problem_type and label count."""
    if task == "fill-mask":
        return FillMask
    if task in ("text-classification", "sentiment-analysis"):
        pt = getattr(config, "problem_type", None)
        if pt == "multi_label_classification":
            return MultiLabel
        if pt == "regression" or getattr(config, "num_labels", 2) == 1:
            return Regression
        return SingleLabel
    raise ConfigError(f"{task or 'this'} models cannot be batch-scored yet: text-classification and fill-mask can")


def length_batches(order: list[int], lengths: list[int], max_rows: int, max_tokens: int) -> Iterator[list[int]]:
    """`order` (positions, longest first) cut into batches of at most `max_rows` texts and `max_tokens` padded
    tokens (texts x the first, longest one); a text longer than `max_tokens` runs alone, never dropped."""
    batch: list[int] = []
    for j in order:
        if batch and (len(batch) == max_rows or (len(batch) + 1) * lengths[batch[0]] > max_tokens):
            yield batch
            batch = []
        batch.append(j)
    if batch:
        yield batch


class Scorer:
    """The model loaded once (this process or one Ray actor); `score(table)` -> prediction columns per row."""

    def __init__(self, pipe: str | Any, cfg: ScoreConfig):
        """`pipe`: a loaded transformers pipeline, or a models:/ URI (its logged pipeline is loaded: model +
        tokenizer, LoRA too)."""
        import inspect

        if isinstance(pipe, str):
            import mlflow

            tracking.configure()
            pipe = mlflow.transformers.load_model(pipe)
        self.cfg = cfg
        self.device = dev.select_device(cfg.device)
        self.dtype = dev.amp_dtype(self.device, cfg.precision)
        if cfg.precision == "auto" and kinds.of_model(pipe.model).EVAL_FP32:
            self.dtype = None  # regression: the number itself is the output (tasks.kinds.regression.EVAL_FP32)
        self.model = pipe.model.to(self.device).eval()
        self.tok = pipe.tokenizer
        self.head = head_class(pipe.task, self.model.config)(self.model, self.tok, cfg)
        self.max_length = min(cfg.max_length or 1 << 30, input_limit(self.tok, self.model.config))
        self.batch_tokens = cfg.batch_tokens or (CPU_BATCH_TOKENS if self.device.type == "cpu" else GPU_BATCH_TOKENS)
        params = inspect.signature(self.model.forward).parameters
        open_sig = any(p.kind == p.VAR_KEYWORD for p in params.values())  # PeftModel: forward(*args, **kwargs)
        self.keys = [k for k in self.tok.model_input_names if open_sig or k in params]
        self.describe = dev.describe(self.device, self.dtype)

    def schema(self):
        import pyarrow as pa

        return pa.schema([pa.field("skipped", pa.string()), *self.head.columns()])

    def score(self, table) -> Any:
        """Prediction columns (a pyarrow table, same row order as `table`): `skipped` is null where scored, else
        the reason; prediction columns are null where skipped."""
        import pyarrow as pa
        import torch

        texts = table.column(self.cfg.text_column).to_pylist()
        pairs = table.column(self.cfg.text_pair_column).to_pylist() if self.cfg.text_pair_column else None
        nontext = table.column(_NONTEXT).to_pylist() if _NONTEXT in table.column_names else [False] * len(texts)
        skipped: list[str | None] = [None] * len(texts)
        todo, a, b = [], [], []
        for i, t in enumerate(texts):
            p = pairs[i] if pairs is not None else ""
            if nontext[i]:
                skipped[i] = SKIP_NOT_TEXT
            elif t is None or not t.strip() or p is None or (pairs is not None and not p.strip()):
                skipped[i] = SKIP_EMPTY
            else:
                t, why = self.head.prepare(t)
                if why:
                    skipped[i] = why
                    continue
                todo.append(i), a.append(t), b.append(p)
        results: list[dict | None] = [None] * len(texts)
        if todo:
            enc = self.tok(a, b if pairs is not None else None, truncation=True, max_length=self.max_length)
            feats = [{k: enc[k][j] for k in self.keys if k in enc} for j in range(len(todo))]
            lengths = [len(f["input_ids"]) for f in feats]
            order = sorted(range(len(todo)), key=lambda j: -lengths[j])  # longest first
            with torch.inference_mode(), dev.autocast(self.device, self.dtype):
                for idx in length_batches(order, lengths, self.cfg.batch_size, self.batch_tokens):
                    batch = self.tok.pad([feats[j] for j in idx], return_tensors="pt")  # dynamic padding
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    for j, r in zip(idx, self.head.rows(self.head.forward(batch), batch)):
                        results[todo[j]] = r
        cols = {"skipped": pa.array(skipped, pa.string())}
        for f in self.head.columns():
            cols[f.name] = pa.array([r[f.name] if r is not None else None for r in results], f.type)
        return pa.table(cols, schema=self.schema())

    def score_chunks(self, table):
        """A table of whole chunks (as Ray hands them): each chunk scored on its own, so its batches are the local
        path's batches; returns positions + ids + predictions."""
        import pyarrow as pa
        import pyarrow.compute as pc

        out = []
        for ci in sorted(set(table.column(_CHUNK).to_pylist())):
            part = table.filter(pc.equal(table[_CHUNK], ci))
            out.append(part_table(part, self.score(part), self.cfg.id_columns))
        return pa.concat_tables(out)


def part_table(chunk, preds, id_columns: list[str]):
    """What a part file holds: positions, the id columns as read, the predictions."""
    import pyarrow as pa

    cols = {c: chunk.column(c) for c in (_CHUNK, _ROW, _N)}
    cols.update({c: chunk.column(c) for c in id_columns})
    cols.update({n: preds.column(n) for n in preds.column_names})
    return pa.table(cols)


# --- output: parts, manifest, final file ----------------------------------------------------------------------


def parts_dir(output: Path) -> Path:
    return output.with_name(f".{output.name}.parts")


def part_path(parts: Path, ci: int) -> Path:
    return parts / f"part-{ci:08d}.parquet"


def done_parts(parts: Path) -> set[int]:
    return {int(m.group(1)) for p in parts.glob("part-*.parquet") if (m := re.fullmatch(r"part-(\d+)\.parquet", p.name))}


def write_part(parts: Path, table) -> None:
    """One chunk's predictions, written then renamed: a killed job leaves whole parts or none."""
    import pyarrow.parquet as pq

    final = part_path(parts, table.column(_CHUNK)[0].as_py())
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    pq.write_table(table.sort_by(_ROW), tmp)
    os.replace(tmp, final)


def _manifest(cfg: ScoreConfig, plan: InputPlan, ref: ModelRef) -> dict:
    return {
        "model": {"name": ref.name, "version": ref.version, "run_id": ref.run_id, "uri": ref.uri,
                  "requested": ref.requested},
        "input": [{"path": str(f.resolve()), "bytes": f.stat().st_size, "mtime": f.stat().st_mtime, "rows": n}
                  for f, n in zip(plan.files, plan.rows)],
        "text_column": cfg.text_column, "text_pair_column": cfg.text_pair_column, "id_columns": cfg.id_columns,
        "chunk_rows": cfg.chunk_rows, "top_k": cfg.top_k, "threshold": cfg.threshold, "max_length": cfg.max_length,
    }


def _start_or_resume(cfg: ScoreConfig, plan: InputPlan, ref: ModelRef, parts: Path) -> tuple[ModelRef, set[int]]:
    """A fresh job, or the unfinished one in `parts` (with `resume`): same input, same chunking, and the model
    version it started with, whatever the alias says now."""
    mine = _manifest(cfg, plan, ref)
    if not (parts / MANIFEST).exists():
        parts.mkdir(parents=True, exist_ok=True)
        for stale in parts.glob("part-*.parquet"):  # parts without a manifest are nobody's: start clean
            stale.unlink()
        write_json_atomic(parts / MANIFEST, mine)
        return ref, set()
    if not cfg.resume:
        raise ConfigError(f"an unfinished scoring job left its parts in {parts}: pass --resume to continue it, or "
                          "delete that folder to start again")
    old = json.loads((parts / MANIFEST).read_text())
    differs = [k for k in ("input", "text_column", "text_pair_column", "id_columns", "chunk_rows", "top_k",
                           "threshold", "max_length") if old.get(k) != mine.get(k)]
    if differs or old["model"]["name"] != ref.name:
        raise ConfigError(f"--resume: the unfinished job in {parts} was started with another "
                          f"{', '.join(differs) or 'registered model'}: use the same settings, or delete that "
                          "folder to start again")
    m = old["model"]
    if m["version"] != ref.version:
        log.warning("resuming with version %s, which the job started with (%s now points to %s)", m["version"],
                    ref.requested, ref.version)
    return ModelRef(m["name"], m["version"], m["run_id"], m["requested"]), done_parts(parts)


def _output_format(cfg: ScoreConfig, plan: InputPlan) -> str:
    return plan.formats[0] if cfg.output_format == "input" else cfg.output_format


def assemble(parts: Path, output: Path, fmt: str, meta: dict, id_columns: list[str]) -> dict:
    """The final file from the parts, in input order, one part in memory at a time, written then renamed.
    Returns the rows out and the skip counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(parts.glob("part-*.parquet"))
    schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive") if files else None
    keep = ["row", *id_columns] + [n for n in (schema.names if schema else []) if n not in
                                    (_CHUNK, _ROW, _N, *id_columns)]
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    output.parent.mkdir(parents=True, exist_ok=True)
    rows, skipped = 0, {}
    writer = None
    try:
        with open(tmp, "wb") as sink:
            for f in files:
                t = pq.read_table(f).cast(schema).rename_columns(
                    ["row" if n == _ROW else n for n in schema.names]).select(keep)
                rows += len(t)
                for why in t.column("skipped").drop_null().to_pylist():
                    skipped[why] = skipped.get(why, 0) + 1
                writer = _write(writer, sink, t, fmt, meta)
            if writer is None and schema is None:  # no input rows: an empty file with no columns but `row`
                writer = _write(None, sink, pa.table({"row": pa.array([], pa.int64())}), fmt, meta)
            if writer is not None and hasattr(writer, "close"):
                writer.close()
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"rows_out": rows, "skipped": skipped}


def _write(writer, sink, t, fmt: str, meta: dict):
    """Appends `t` to the output: Parquet (schema metadata: the model version), CSV/TSV (nested values as JSON),
    JSONL. Returns the writer to reuse."""
    import pyarrow as pa

    if fmt == "parquet":
        import pyarrow.parquet as pq

        if writer is None:
            schema = t.schema.with_metadata({META_KEY: json.dumps(meta).encode()})
            writer = pq.ParquetWriter(sink, schema)
        writer.write_table(t.cast(writer.schema))
        return writer
    if fmt in ("csv", "tsv"):
        import pyarrow.csv as pcsv

        for i, f in enumerate(t.schema):
            if pa.types.is_list(f.type) or pa.types.is_large_list(f.type):
                t = t.set_column(i, f.name, pa.array([None if v is None else json.dumps(v) for v in
                                                      t.column(i).to_pylist()], pa.string()))
        if writer is None:
            writer = pcsv.CSVWriter(sink, t.schema, write_options=pcsv.WriteOptions(
                delimiter="\t" if fmt == "tsv" else ","))
        writer.write_table(t)  # every part was cast to one schema by `assemble`
        return writer
    for rec in t.to_pylist():  # jsonl
        sink.write((json.dumps(rec, ensure_ascii=False, default=str) + "\n").encode())
    return writer or "jsonl"


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + ".meta.json")


# --- on Ray Data ----------------------------------------------------------------------------------------------
# Batch scoring on Ray Data (`finetune score --workers N` / `--ray-address`): the local path's chunk reader and
# scorer, spread out. One read task yields the input's chunks in order (the local path's chunks, already scored
# ones skipped), a strict streaming repartition keeps one chunk per block, and `map_batches` with an actor pool
# scores them, each actor loading the model once
# (`cpus_per_worker` / `gpus_per_worker` each); the driver receives positions + ids + predictions (small) and
# writes each chunk's part as soon as the chunk is complete, so output, resume and the final file are the local
# path's. Each chunk is scored on its own inside an actor, so its batches are the local path's batches.
#
# On a cluster every node needs this project installed (same versions) and the input files at the same path (a
# shared file system or object store mount); the driver passes MLFLOW_TRACKING_URI and PYTHONPATH to the actors.

# what the actors need from this process's environment (runtime_env env_vars)
PASS_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
            "PYTHONPATH", "HF_HUB_OFFLINE", "HF_HOME", "FINETUNE_CACHE_DIR", "TOKENIZERS_PARALLELISM",
            "TRANSFORMERS_VERBOSITY", "TQDM_DISABLE", "FINETUNE_VERBOSE")


def _read_chunks(batch, plan: InputPlan, chunk_rows: int, skip: set):
    """Ray Data UDF: the whole input's chunks, in order, one at a time (a generator)."""
    for _, table in iter_chunks(plan, chunk_rows, skip=skip):
        yield table


class _ScoreActor:
    """Ray Data actor: the model once, then whole chunks scored as on the local path."""

    def __init__(self, model_uri: str, cfg: ScoreConfig):
        self.scorer = Scorer(model_uri, cfg)

    def __call__(self, table):
        return self.scorer.score_chunks(table)


def _init_ray(cfg: ScoreConfig) -> bool:
    """Connects to `ray_address` or starts a local Ray sized for the actors; True when this call started it."""
    import ray

    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if ray.is_initialized():
        return False
    output.quiet_ray()
    kw: dict = {"runtime_env": {"env_vars": env}, "include_dashboard": False, "log_to_driver": False,
                "configure_logging": False}
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, **kw)
    else:
        workers = cfg.workers or 1
        kw["num_cpus"] = max(1, int(-(-workers * cfg.cpus_per_worker // 1)))
        if cfg.gpus_per_worker:
            kw["num_gpus"] = int(-(-workers * cfg.gpus_per_worker // 1))
        ray.init(**kw)
    return True


def cluster_description() -> str:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)
    gpus = sum(n.get("Resources", {}).get("GPU", 0) for n in nodes)
    return f"{len(nodes)} node(s), {cpus:g} CPU, {gpus:g} GPU"


def score_on_ray(cfg: ScoreConfig, plan: InputPlan, ref: ModelRef, skip: set,
                 on_part: Callable[[object], None]) -> str:
    """Scores every chunk not in `skip`; calls `on_part(table)` with each completed chunk (positions, ids,
    predictions). Returns a description of where it ran."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    started = _init_ray(cfg)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        workers = cfg.workers or max(1, int(sum(n.get("Resources", {}).get("CPU", 0) for n in ray.nodes()
                                                if n.get("Alive")) // cfg.cpus_per_worker))
        ctx.execution_options.preserve_order = True  # the chunk stream stays in order, so blocks = chunks
        ds = ray.data.from_items([{"input": 0}], override_num_blocks=1)
        # reading is I/O and parsing: no CPU reserved, so the actors can take every CPU of the cluster
        ds = ds.map_batches(_read_chunks, fn_kwargs={"plan": plan, "chunk_rows": cfg.chunk_rows, "skip": skip},
                            batch_size=1, batch_format="pyarrow", num_cpus=0)
        # one block per chunk: every chunk but the last has exactly chunk_rows rows, in order
        ds = ds.repartition(target_num_rows_per_block=cfg.chunk_rows, strict=True)
        # Re-slicing blocks is cheap, but its tasks ask for a CPU by default, which the actors may all hold (a
        # deadlock on a cluster sized for them); repartition() takes no resource arguments, so set them on its op.
        try:
            ds._logical_plan.dag.ray_remote_args.update(num_cpus=0)
        except AttributeError:  # another Ray version: keep its default and say what it needs
            import logging

            logging.getLogger(__name__).warning(
                "could not free Ray Data's repartition step from its CPU request: leave one CPU of the cluster "
                "beyond the scoring actors (--workers x --cpus-per-worker)")
        ds = ds.map_batches(_ScoreActor, fn_constructor_args=(ref.uri, cfg), batch_size=None,
                            batch_format="pyarrow", concurrency=workers, num_cpus=cfg.cpus_per_worker,
                            num_gpus=cfg.gpus_per_worker or None)
        pending: dict[int, list] = {}
        for t in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for ci in sorted(set(t.column(_CHUNK).to_pylist())):
                piece = t.filter(pc.equal(t[_CHUNK], ci))
                pending.setdefault(ci, []).append(piece)
                if sum(len(p) for p in pending[ci]) == piece.column(_N)[0].as_py():
                    on_part(pa.concat_tables(pending.pop(ci)))
        if pending:
            raise RuntimeError(f"Ray returned incomplete chunks {sorted(pending)}")
        return f"Ray: {workers} actor(s) on {cluster_description()}"
    finally:
        if started:
            ray.shutdown()


# --- the job --------------------------------------------------------------------------------------------------

Progress = Callable[[int, int], None]


def score(cfg: ScoreConfig, progress: Progress | None = None, ref: ModelRef | None = None) -> dict:
    """Score `cfg.input` with the registered model into `cfg.output`; returns the summary (also written beside
    the output as `<output>.meta.json`). `progress(rows done, rows total)` after each chunk."""
    t0 = time.time()
    plan = plan_input(cfg)  # bad input: one error, before the registry or the model
    ref = ref or resolve_model(cfg.registered_model, cfg.alias, cfg.version)
    output = Path(cfg.output)
    fmt = _output_format(cfg, plan)
    count_rows(plan)
    total = sum(plan.rows)
    parts = parts_dir(output)
    ref, done = _start_or_resume(cfg, plan, ref, parts)
    # the manifest keeps what the user asked for (None: the model's threshold); the scorers get the value itself
    cfg = cfg.model_copy(update={"threshold": cfg.threshold if cfg.threshold is not None else model_threshold(ref.uri)})
    rows_done = sum(_part_rows(parts, k) for k in done)
    if done:
        log.info("resuming: %d of %d chunks already scored (%d rows)", len(done), _n_chunks(plan, cfg), rows_done)
    if progress:
        progress(rows_done, total)
    counter = {"done": rows_done, "scored_now": 0}

    def on_part(t) -> None:
        write_part(parts, t)
        counter["done"] += len(t)
        counter["scored_now"] += len(t)
        if progress:
            progress(counter["done"], total)

    t_load = time.time()
    if cfg.on_ray:
        device = score_on_ray(cfg, plan, ref, done, on_part)
        load_s = None
    else:
        scorer = Scorer(ref.uri, cfg)
        load_s = time.time() - t_load
        device = scorer.describe
        for _, chunk in iter_chunks(plan, cfg.chunk_rows, skip=done):
            on_part(part_table(chunk, scorer.score(chunk), cfg.id_columns))
    score_s = time.time() - t_load - (load_s or 0)
    meta = {"model": {"name": ref.name, "version": ref.version, "run_id": ref.run_id, "uri": ref.uri,
                      "requested": ref.requested},
            "input": [str(f) for f in plan.files], "output": str(output), "format": fmt}
    if "labels" in part_columns(parts):  # multi-label predictions: the threshold that picked them
        meta["threshold"] = cfg.threshold
    out = assemble(parts, output, fmt, meta, cfg.id_columns)
    if out["rows_out"] != total:  # every input row exactly once, or no success
        raise RuntimeError(f"scoring wrote {out['rows_out']} rows for {total} input rows; parts kept in {parts}")
    summary = {
        **meta, "rows_in": total, "rows_out": out["rows_out"],
        "rows_skipped": sum(out["skipped"].values()), "skipped": out["skipped"],
        "rows_scored_this_run": counter["scored_now"], "resumed_rows": rows_done,
        "model_load_seconds": None if load_s is None else round(load_s, 2),
        "scoring_seconds": round(score_s, 2),
        "rows_per_second": round(counter["scored_now"] / score_s, 1) if score_s > 0 else None,
        "wall_seconds": round(time.time() - t0, 2), "device": device, "engine": "ray" if cfg.on_ray else "local",
        "workers": cfg.workers, "ray_address": cfg.ray_address, "chunk_rows": cfg.chunk_rows,
    }
    write_json_atomic(sidecar_path(output), summary)
    import shutil

    shutil.rmtree(parts, ignore_errors=True)
    return summary


def model_threshold(model_uri: str) -> float:
    """The threshold a multi-label model was trained with, as its logged model recorded it (metadata `threshold`,
    what `finetune predict` uses); 0.5 for a model that recorded none."""
    return float(kinds.model_metadata(model_uri).get("threshold", DEFAULT_THRESHOLD))


def part_columns(parts: Path) -> list[str]:
    """The columns of the scored parts (a part's schema; every part has the same prediction columns)."""
    import pyarrow.parquet as pq

    first = next(iter(sorted(parts.glob("part-*.parquet"))), None)
    return pq.read_schema(first).names if first else []


def _part_rows(parts: Path, ci: int) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(part_path(parts, ci)).metadata.num_rows


def _n_chunks(plan: InputPlan, cfg: ScoreConfig) -> int:
    return -(-sum(plan.rows) // cfg.chunk_rows)


def format_summary(s: dict) -> str:
    skipped = ", ".join(f"{n} {why}" for why, n in s["skipped"].items()) or "none"
    m = s["model"]
    rate = f"{s['rows_per_second']:,.1f} rows/s" if s.get("rows_per_second") else "-"
    return "\n".join([
        f"scored {s['rows_out']:,} of {s['rows_in']:,} rows with {m['name']} version {m['version']} "
        f"(run {m['run_id']}; asked for {m['requested']})",
        f"  skipped (kept with a null prediction): {skipped}",
        *([f"  multi-label threshold: {s['threshold']:g}"] if s.get("threshold") is not None else []),
        f"  this run: {s['rows_scored_this_run']:,} rows at {rate} on {s['device']} ({s['engine']})"
        + (f", {s['resumed_rows']:,} rows from the interrupted run" if s["resumed_rows"] else ""),
        f"  output: {s['output']} ({s['format']}); model and counts: {sidecar_path(Path(s['output']))}",
    ])
