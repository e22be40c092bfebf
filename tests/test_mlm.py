"""Masked-LM unit tests on a tiny config-built BERT: blocks, masking on real collated batches, the loss that
replaces SFTTrainer's causal one, a real SFTTrainer fit, the plain loop, and fill-mask from the registry."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.config import ConfigError, MLMConfig, build_config

# Two sentences, repeated: after a short fit "this is a [MASK] movie !" must give "great" first. A model trained
# on a shifted (next-token) objective answers with the word after the mask instead: this catches it.
CORPUS = ["this is a great movie !", "the cat sat on the mat ."]


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def mlm_env(tmp_path_factory):
    """Dataset cache and MLflow store for the module-scoped fits (the `isolated` fixture is per test)."""
    root = tmp_path_factory.mktemp("mlm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_CACHE_DIR", str(root / "cache"))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        import tasks.tracking as tracking

        mp.setattr(tracking, "STORE_DIR", root / "mlstore")
        yield root


@pytest.fixture(scope="module")
def corpus_file(mlm_env) -> str:
    p = mlm_env / "corpus.txt"
    p.write_text("\n".join(CORPUS * 200) + "\n")
    return str(p)


def _corpus_cfg(model: str, corpus: str, out: Path, engine: str = "sft", epochs: int = 6) -> MLMConfig:
    # Truncated (not grouped): one sentence per row, so a 2-layer, 32-wide BERT learns it in ~100 steps.
    return MLMConfig(
        engine=engine,
        group_texts=False,
        data={"dataset": corpus, "max_length": 16, "eval_fraction": 0.2, "eval_samples": 40},
        train={"model": model, "freeze_embeddings": False, "dropout": None, "group_by_length": False, "epochs": epochs, "batch_size": 16, "eval_batch_size": 64, "learning_rate": 1e-2,
               "output_dir": str(out), "seed": 0},
    )


@pytest.fixture(scope="module")
def imdb_blocks(mlm_env, tiny_model_dir) -> dict:
    """Real IMDB reviews (embedded), tokenized both ways: grouped into 64-token blocks and truncated to 64."""
    from tasks.data import prepare_dataset
    from tasks.mlm_data import tokenize_for_mlm

    cfg = MLMConfig(data={"train_samples": 60, "eval_samples": 20, "max_length": 64})
    data = prepare_dataset(cfg.data, 0)
    return {
        "grouped": tokenize_for_mlm(data.path, tiny_model_dir, 64, True, 0.15, 0),
        "truncated": tokenize_for_mlm(data.path, tiny_model_dir, 64, False, 0.15, 0),
    }


@pytest.fixture(scope="module")
def tiny_encoder_dir(mlm_env, tiny_model_dir) -> str:
    """The tiny BERT saved without its MLM head, as the bundled MiniLM ships: `cls.predictions.*` are new weights."""
    from transformers import BertModel

    out = mlm_env / "tiny-encoder"
    BertModel.from_pretrained(tiny_model_dir).save_pretrained(out)
    _tokenizer(tiny_model_dir).save_pretrained(out)
    return str(out)


# --- data: blocks and masking ------------------------------------------------------------------------------


def test_blocks_grouped_and_truncated(imdb_blocks, tiny_model_dir):
    from datasets import load_from_disk

    from tasks.mlm_data import mlm_stats

    tok = _tokenizer(tiny_model_dir)
    grouped = load_from_disk(imdb_blocks["grouped"])
    assert {len(x) for x in grouped["train"]["input_ids"]} == {64}  # packed: every block full
    assert "labels" not in grouped["train"].column_names  # masked per batch, later
    assert "labels" in grouped["eval"].column_names  # masked once, fixed
    stats = mlm_stats(imdb_blocks["grouped"])
    assert stats["train_blocks"] == len(grouped["train"]) and stats["train_tokens"] == 64 * len(grouped["train"])
    truncated = load_from_disk(imdb_blocks["truncated"])
    ids = truncated["train"]["input_ids"]
    assert max(len(x) for x in ids) == 64 and len(ids) == 60  # one row per review
    assert all(x[0] == tok.cls_token_id and x[-1] == tok.sep_token_id for x in ids)


@pytest.mark.parametrize("mode", ["grouped", "truncated"])
def test_masking_on_collated_batches(imdb_blocks, tiny_model_dir, mode):
    """15% of non-special tokens chosen, 80/10/10, -100 on every unchosen and every special position (padding too)."""
    import torch
    from datasets import load_from_disk

    from tasks.mlm_data import MLMBatchCollator

    tok = _tokenizer(tiny_model_dir)
    rows = list(load_from_disk(imdb_blocks[mode])["train"])
    collate = MLMBatchCollator(tok, 0.15, seed=0)
    special_ids = torch.tensor(tok.all_special_ids)
    chosen = maskable = as_mask = unchanged = 0
    for i in range(0, 3 * len(rows), 8):  # three passes: fresh masks each time, as across epochs
        chunk = (rows * 3)[i : i + 8]
        batch = collate(chunk)
        labels, inputs = batch["labels"], batch["input_ids"]
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        orig = torch.full_like(inputs, tok.pad_token_id)
        for r, row in enumerate(chunk):
            orig[r, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        special = torch.isin(orig, special_ids)
        sel = labels != -100
        assert not (sel & special).any(), "a special token (CLS/SEP/PAD) was masked"
        assert torch.equal(labels[sel], orig[sel])  # labels hold the original token
        assert torch.equal(inputs[~sel], orig[~sel])  # unchosen positions untouched
        chosen += int(sel.sum())
        maskable += int((~special).sum())
        as_mask += int((inputs[sel] == tok.mask_token_id).sum())
        unchanged += int((inputs[sel] == orig[sel]).sum())
    assert maskable > 10000
    assert chosen / maskable == pytest.approx(0.15, abs=0.015)
    assert as_mask / chosen == pytest.approx(0.8, abs=0.05)
    assert unchanged / chosen == pytest.approx(0.1, abs=0.05)  # plus a random-token draw that hits the original


def test_eval_split_is_masked_once(imdb_blocks, tiny_model_dir):
    from datasets import load_from_disk

    from tasks.mlm_data import MLMBatchCollator

    tok = _tokenizer(tiny_model_dir)
    rows = list(load_from_disk(imdb_blocks["truncated"])["eval"])
    a = MLMBatchCollator(tok, 0.15, seed=1)(rows)
    b = MLMBatchCollator(tok, 0.15, seed=2)(rows)
    assert all((a[k] == b[k]).all() for k in a)  # same masks whatever the training collator's seed
    sel = a["labels"] != -100
    assert 0.10 < sel.sum() / (a["attention_mask"].sum() - 2 * len(rows)) < 0.20
    assert (a["labels"][a["attention_mask"] == 0] == -100).all()


def test_training_mask_rate_apart_from_the_eval_masks(imdb_blocks, tiny_model_dir):
    """`train_mlm_probability` masks training batches at its own rate; the held-out rows keep the masks they were
    given at `mlm_probability`, so perplexity stays comparable with runs that train at another rate."""
    from datasets import load_from_disk

    from tasks.jobs import mlm as tm

    tok = _tokenizer(tiny_model_dir)
    dd = load_from_disk(imdb_blocks["grouped"])
    train_rows, eval_rows = list(dd["train"]), list(dd["eval"])
    shares, evals = {}, []
    for p in (None, 0.4):
        spec = MLMConfig(train_mlm_probability=p).spec()
        collate = tm.collator(tok, spec)
        batch = collate(train_rows)
        maskable = (batch["attention_mask"].sum() - 2 * len(train_rows)).item()
        shares[p] = (batch["labels"] != -100).sum().item() / maskable
        evals.append(collate(eval_rows)["labels"])
    assert shares[None] == pytest.approx(0.15, abs=0.02) and shares[0.4] == pytest.approx(0.4, abs=0.03)
    assert (evals[0] == evals[1]).all()  # the eval masks do not move with the training rate
    with pytest.raises(ConfigError, match="train_mlm_probability"):
        build_config(MLMConfig, None, {"train_mlm_probability": 1.0})


def test_a_new_heads_output_bias_starts_at_the_training_tokens_log_frequencies(imdb_blocks, tiny_model_dir):
    """A newly initialised head (zero output bias) starts from the training split's unigram prior: its epoch-0 loss
    on the held-out masks drops below the zero-bias head's and the uniform guess's log(vocab). A head that already has a bias, or
    `unigram_head_bias: false`, is left as it is."""
    import math

    import torch
    from datasets import load_from_disk

    from tasks.jobs import mlm as tm

    spec = MLMConfig(train={"model": tiny_model_dir}).spec()
    fresh = tm.load_model(tiny_model_dir, spec)
    bias = fresh.get_output_embeddings().bias
    assert not torch.count_nonzero(bias)  # what HF gives a head the checkpoint lacks
    tm.init_head_bias(fresh, imdb_blocks["grouped"], spec)
    train = load_from_disk(imdb_blocks["grouped"])["train"]
    ids = torch.tensor([i for r in train for i, s in zip(r["input_ids"], r["special_tokens_mask"]) if not s])
    counts = torch.bincount(ids, minlength=bias.numel()).double() + 0.1
    expected = counts.log() - counts.log().mean()
    assert torch.allclose(bias.double(), expected, atol=1e-4)
    common, special = int(ids.bincount().argmax()), _tokenizer(tiny_model_dir).cls_token_id
    assert bias[common] > bias[special] and bias[special] == bias.min()  # never a target, never counted

    tok = _tokenizer(tiny_model_dir)
    loader = torch.utils.data.DataLoader(list(load_from_disk(imdb_blocks["grouped"])["eval"]), batch_size=8,
                                         collate_fn=tm.collator(tok, spec))
    untouched = tm.load_model(tiny_model_dir, spec)
    before = tm.evaluate_mlm(untouched, loader, torch.device("cpu"))["eval_loss"]
    after = tm.evaluate_mlm(fresh, loader, torch.device("cpu"))["eval_loss"]
    assert after < min(before, math.log(bias.numel()))  # the prior beats the zero-bias head and a uniform guess

    for model, s in ((fresh, spec), (untouched, MLMConfig(unigram_head_bias=False).spec())):
        kept = model.get_output_embeddings().bias.detach().clone()
        tm.init_head_bias(model, imdb_blocks["grouped"], s)
        assert torch.equal(model.get_output_embeddings().bias, kept)


@pytest.mark.parametrize("engine", ["sft", "manual"])
def test_a_new_head_learns_at_its_own_rate(engine, mlm_env, tiny_encoder_dir, corpus_file, monkeypatch):
    """`head_learning_rate_scale`: the weights the checkpoint did not ship (an encoder-only checkpoint, like the
    bundled MiniLM, has no MLM head: `cls.predictions.*`) take scale x learning_rate in both engines' optimizers,
    every pretrained weight keeps learning_rate. At the default scale 1 the optimizer has the two usual groups."""
    import torch

    from tasks.data import prepare_dataset
    from tasks.jobs import mlm as tm
    from tasks.mlm_data import tokenize_for_mlm
    from tasks.training import param_groups, train

    seen: list[list[tuple[float, int]]] = []
    original = torch.optim.AdamW.__init__

    def spy(self, params, *a, **kw):
        original(self, params, *a, **kw)
        seen.append([(g["lr"], len(g["params"])) for g in self.param_groups])

    monkeypatch.setattr(torch.optim.AdamW, "__init__", spy)
    cfg = _corpus_cfg(tiny_encoder_dir, corpus_file, mlm_env / "out", engine=engine, epochs=1)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"head_learning_rate_scale": 10.0})})
    spec = cfg.spec()
    model = tm.load_model(tiny_encoder_dir, spec)
    new = {n for n, p in model.named_parameters() if p.requires_grad and any(p is q for g in param_groups(
        model, spec.train)[2:] for q in g["params"])}
    assert new and all(n.startswith("cls.predictions.") for n in new)
    assert [g["lr"] for g in param_groups(model, spec.train)] == pytest.approx([1e-2, 1e-2, 1e-1, 1e-1])
    one = cfg.model_copy(update={"train": cfg.train.model_copy(update={"head_learning_rate_scale": 1.0})}).spec()
    assert len(param_groups(model, one.train)) == 2

    data = prepare_dataset(cfg.data, cfg.train.seed)
    tokenized = tokenize_for_mlm(data.path, cfg.train.model, cfg.data.max_length, False, 0.15, cfg.train.seed)
    train(spec, tokenized, str(mlm_env / "out" / f"head-lr-{engine}"))
    [groups] = [g for g in seen if len(g) > 2]  # the training optimizer
    assert [lr for lr, _ in groups] == pytest.approx([1e-2, 1e-2, 1e-1, 1e-1])
    assert sum(n for _, n in groups[2:]) == len(new)


@pytest.mark.parametrize("engine", ["sft", "manual"])
def test_resuming_with_other_optimizer_groups_is_a_config_error(engine, mlm_env, tiny_encoder_dir, corpus_file):
    """A checkpoint (either engine's) written at head_learning_rate_scale 1 (two optimizer groups, as before the option
    existed) resumed at 10 (four): a one-line ConfigError that names the fix; the checkpoint stays."""
    from tasks.data import prepare_dataset
    from tasks.mlm_data import tokenize_for_mlm
    from tasks.training import train

    cfg = _corpus_cfg(tiny_encoder_dir, corpus_file, mlm_env / "out", engine=engine, epochs=1)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"head_learning_rate_scale": 1.0})})
    data = prepare_dataset(cfg.data, cfg.train.seed)
    tokenized = tokenize_for_mlm(data.path, cfg.train.model, cfg.data.max_length, False, 0.15, cfg.train.seed)
    run = mlm_env / "out" / f"resume-groups-{engine}"
    train(cfg.spec(), tokenized, str(run))
    checkpoints = sorted(p for p in run.rglob("*") if p.is_file())
    again = cfg.model_copy(update={"train": cfg.train.model_copy(update={"head_learning_rate_scale": 10.0,
                                                                          "resume": True})})
    with pytest.raises(ConfigError, match="2 parameter groups, this run builds 4.*--head-learning-rate-scale 1"):
        train(again.spec(), tokenized, str(run))
    assert sorted(p for p in run.rglob("*") if p.is_file()) == checkpoints


def test_bundled_minilm_has_no_mlm_head():
    from tasks.tokenize import check_model

    info = check_model("bundled-minilm", 128, masked_lm=True)
    assert info["has_mlm_head"] is False and info["mask_token"] == "[MASK]"


# --- the loss that replaces SFTTrainer's causal one --------------------------------------------------------


def _tiny_roberta(tok):
    from transformers import RobertaConfig, RobertaForMaskedLM

    cfg = RobertaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=40, pad_token_id=tok.pad_token_id)
    return RobertaForMaskedLM(cfg)


def test_masked_loss_is_the_models_own_not_trls_shifted(tiny_model_dir):
    """Our loss (prediction head on masked positions only) == the model's own masked-LM loss, for BERT and
    RoBERTa; TRL's stock fused head (next-token) gives a different number on the same batch."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForMaskedLM
    from trl.trainer.utils import add_fused_lm_head

    from tasks.mlm_data import MLMBatchCollator
    from tasks.jobs.mlm import masked_lm_logits

    tok = _tokenizer(tiny_model_dir)
    batch = MLMBatchCollator(tok, 0.3, seed=0)(
        [tok(t, return_special_tokens_mask=True) for t in CORPUS + ["a much longer third sentence about films"]]
    )
    torch.manual_seed(0)
    for model in (AutoModelForMaskedLM.from_pretrained(tiny_model_dir), _tiny_roberta(tok)):
        model.eval()
        own = model(**batch).loss
        logits, targets = masked_lm_logits(model, batch)
        assert logits.shape == (int((batch["labels"] != -100).sum()), tok.vocab_size)
        assert F.cross_entropy(logits, targets).item() == pytest.approx(own.item(), rel=1e-5)
    bert = AutoModelForMaskedLM.from_pretrained(tiny_model_dir).eval()
    add_fused_lm_head(bert)
    shifted = bert(**batch, fused_lm_head=True).loss
    assert abs(shifted.item() - bert(**batch).loss.item()) > 1e-3


# --- fits: SFTTrainer for real, the plain loop, and fill-mask from the registry ----------------------------


@pytest.fixture(scope="module")
def sft_fit(mlm_env, corpus_file, tiny_model_dir):
    """One real SFTTrainer fit on the two-sentence corpus, shared by the tests below."""
    import trl

    from tasks.jobs import mlm as tm
    from tasks.training import train
    from tasks.data import prepare_dataset
    from tasks.mlm_data import tokenize_for_mlm

    cfg = _corpus_cfg(tiny_model_dir, corpus_file, mlm_env / "out")
    data = prepare_dataset(cfg.data, cfg.train.seed)
    tokenized = tokenize_for_mlm(data.path, cfg.train.model, cfg.data.max_length, False, 0.15, cfg.train.seed)
    seen = {"loss_calls": 0, "train_calls": 0, "mro": ()}
    original = tm.sft_trainer_class

    def spy_class():
        base = original()

        class Spy(base):
            def compute_loss(self, *a, **kw):
                seen["loss_calls"] += 1
                return super().compute_loss(*a, **kw)

            def train(self, *a, **kw):
                seen["train_calls"] += 1
                seen["mro"] = type(self).__mro__
                return super().train(*a, **kw)

        return Spy

    logged: list[tuple[int, dict]] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tm, "sft_trainer_class", spy_class)
        result = train(cfg.spec(), tokenized, str(mlm_env / "out" / "sft"), on_metrics=lambda m, s: logged.append((s, m)))
    assert trl.SFTTrainer in seen["mro"]
    return {"cfg": cfg, "tokenized": tokenized, "result": result, "seen": seen, "logged": logged, "data": data}


def test_sft_trainer_really_trains_the_masked_objective(sft_fit, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    cfg, result, seen = sft_fit["cfg"], sft_fit["result"], sft_fit["seen"]
    steps_per_epoch = -(-sft_fit["data"].num_train // cfg.train.batch_size)
    assert seen["train_calls"] == 1
    assert seen["loss_calls"] >= steps_per_epoch * cfg.train.epochs  # training steps (+ eval batches)
    ckpts = sorted((Path(result.model_dir).parent / "trainer").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    assert state["global_step"] == steps_per_epoch * cfg.train.epochs  # TRL/transformers' loop did the steps

    h = result.history
    assert [r["epoch"] for r in h] == list(range(cfg.train.epochs + 1))
    assert "train_loss" not in h[0] and all("train_loss" in r for r in h[1:])
    assert h[-1]["train_loss"] < h[1]["train_loss"] * 0.3  # loss falls on the repetitive corpus
    assert h[-1]["eval_loss"] < h[0]["eval_loss"] * 0.1
    assert h[-1]["eval_masked_accuracy"] > 0.9 > h[0]["eval_masked_accuracy"]
    assert h[-1]["perplexity"] == pytest.approx(torch.tensor(h[-1]["eval_loss"]).exp().item())
    assert [s for s, _ in sft_fit["logged"]] == list(range(cfg.train.epochs + 1))
    assert not any("token_accuracy" in k or "entropy" in k for _, m in sft_fit["logged"] for k in m)

    before, after = load_file(f"{tiny_model_dir}/model.safetensors"), load_file(f"{result.model_dir}/model.safetensors")
    assert not torch.equal(before["cls.predictions.transform.dense.weight"], after["cls.predictions.transform.dense.weight"])
    assert not torch.equal(before["bert.encoder.layer.0.attention.self.query.weight"],
                           after["bert.encoder.layer.0.attention.self.query.weight"])
    saved = json.loads((Path(result.model_dir) / "metrics.json").read_text())
    assert saved["final"]["epoch"] == cfg.train.epochs and (Path(result.model_dir) / "config.yaml").exists()


def test_manual_engine_same_job_same_eval(sft_fit, mlm_env, tiny_model_dir, corpus_file):
    """The plain loop on the same blocks, collator and fixed eval masks: epoch 0 identical, and it learns."""
    from tasks.training import train

    cfg = _corpus_cfg(tiny_model_dir, corpus_file, mlm_env / "out", engine="manual", epochs=2)
    result = train(cfg.spec(), sft_fit["tokenized"], str(mlm_env / "out" / "manual"))
    sft0, man0 = sft_fit["result"].history[0], result.history[0]
    assert [r["epoch"] for r in result.history] == [0, 1, 2]
    assert man0["eval_loss"] == pytest.approx(sft0["eval_loss"], rel=1e-5)
    assert result.history[-1]["eval_loss"] < man0["eval_loss"] * 0.5
    assert (Path(result.model_dir) / "model.safetensors").exists()


@pytest.mark.parametrize("engine", ["sft", "manual"])
def test_training_steps_use_the_sparse_head_under_the_runs_autocast(engine, mlm_env, tiny_model_dir, corpus_file,
                                                                    monkeypatch):
    """Both engines train through `masked_lm_logits` (the head on masked positions only) and under the run's mixed
    precision. The SFT engine once bypassed accelerate's autocast (it wraps `model.forward`, which the sparse head
    does not call), so its steps ran in fp32 at half the speed; the plain loop ran the full head."""
    import torch

    from tasks.data import prepare_dataset
    from tasks.jobs import mlm as tm
    from tasks.mlm_data import tokenize_for_mlm
    from tasks.training import train

    calls: list[tuple[bool, bool]] = []
    original = tm.masked_lm_logits

    def spy(model, inputs):
        calls.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        return original(model, inputs)

    monkeypatch.setattr(tm, "masked_lm_logits", spy)
    cfg = _corpus_cfg(tiny_model_dir, corpus_file, mlm_env / "out", engine=engine, epochs=1)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": "bf16", "device": "cpu"})})
    data = prepare_dataset(cfg.data, cfg.train.seed)
    tokenized = tokenize_for_mlm(data.path, cfg.train.model, cfg.data.max_length, False, 0.15, cfg.train.seed)
    train(cfg.spec(), tokenized, str(mlm_env / "out" / f"autocast-{engine}"))
    steps = [autocast for grad, autocast in calls if grad]
    assert len(steps) == 20  # 320 training rows in batches of 16: every step went through the sparse head
    assert all(steps), f"{steps.count(False)} of {len(steps)} training steps ran without autocast"


def test_fill_mask_from_the_registry(sft_fit):
    """The fitted model, logged (transformers flavor, fill-mask) and registered, then loaded back by URI."""
    from tasks import registry, tracking
    from tasks.predict import model_task, predict

    run_id = tracking.start_run("test-mlm", "fill-mask", {"job": "mlm"})
    uri = tracking.log_model(run_id, sft_fit["result"].model_dir, "fill-mask", input_example=["this is a [MASK] movie !"])
    version = registry.register_model(uri, "tiny-fill-mask", run_id)
    tracking.end_run(run_id)
    model_uri = registry.model_uri("tiny-fill-mask", version=version)
    assert model_task(model_uri) == "fill-mask"

    [res] = predict(model_uri, ["This is a [MASK] movie!"], top_k=4)
    [cands] = res["masks"]
    assert len(cands) == 4
    scores = [c["score"] for c in cands]
    assert scores == sorted(scores, reverse=True)
    assert cands[0]["token_str"] == "great" and cands[0]["score"] > 0.5, cands
    assert cands[0]["sequence"].startswith("this is a great movie")

    [two] = predict(model_uri, ["[MASK] is a great movie ! the cat sat on the [MASK] ."], top_k=3)
    assert len(two["masks"]) == 2 and all(len(m) == 3 for m in two["masks"])
    assert all("token_str" in c for m in two["masks"] for c in m)
    with pytest.raises(ConfigError, match="no mask"):
        predict(model_uri, ["This is a great movie!"], top_k=3)
