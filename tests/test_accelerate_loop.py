"""The training step on accelerate (issue 19), as far as a CPU can test it: the precision choice for GPUs that only
emulate bf16 (capabilities stubbed), TF32; the no-decay rule by module type; gradient accumulation (the weights of
one batch of the group's size, in both engines); masks that differ per rank; the fp16 + loss-scaling path and its
resume; a resumed MLM run equal to an uninterrupted one in both engines (the masking collator's generator travels
in the checkpoint, done batches are skipped at the sampler); a rank imports no Prefect; a diverging run stops with
one line; and, with 2 gloo processes, warmup and steps per epoch from the global batch in both engines and MLM
masks per rank and resume (slow)."""
from __future__ import annotations

import json
import math

import pytest

from flows.config import ClassifyConfig, MLMConfig
from tasks.common import ConfigError


class Boom(RuntimeError):
    pass


# --- precision ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("capability,want", [((7, 5), "float16"), ((7, 0), "float16"), ((8, 0), "bfloat16"),
                                             ((9, 0), "bfloat16")])
def test_auto_precision_on_cuda_takes_bf16_only_where_native(monkeypatch, capability, want):
    """T4 (7.5) and V100 (7.0) report bf16 as supported (emulated, slow): they take fp16 with loss scaling."""
    import torch

    from tasks import device as dev

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what an emulating GPU says
    assert dev.amp_dtype(torch.device("cuda"), "auto") == getattr(torch, want)
    assert dev.amp_dtype(torch.device("cuda"), "fp32") is None


def test_tf32_only_on_gpus_that_have_it(monkeypatch):
    import torch

    from tasks import device as dev

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))
        assert not dev.enable_tf32(torch.device("cuda")) and not torch.backends.cuda.matmul.allow_tf32
        assert not dev.enable_tf32(torch.device("cpu"))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
        assert dev.enable_tf32(torch.device("cuda")) and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_fp16_on_the_cpu_scales_and_unscales_before_clipping():
    """accelerate alone runs no scaler on the CPU; ours does, and clipping sees unscaled gradients."""
    import torch

    from tasks.training.loop import make_accelerator

    acc = make_accelerator(torch.device("cpu"), torch.float16)
    assert acc.scaler is not None and acc.mixed_precision == "fp16"
    torch.manual_seed(0)  # seeded, and a loss small enough that its gradients x 65536 stay finite in fp16: an
    m = torch.nn.Linear(4, 2)  # overflow would (rightly) skip the step, which is not what this test is about
    m, opt = acc.prepare(m, torch.optim.AdamW(m.parameters()))
    x = torch.randn(8, 4)
    with acc.autocast():
        assert (x @ x.T).dtype == torch.float16
        loss = m(x).float().pow(2).mean() * 1e-3
    acc.backward(loss)
    norm = acc.clip_grad_norm_(m.parameters(), 1e9)
    assert float(norm) < 100  # unscaled (the scale is 65536)
    opt.step()
    assert not acc.optimizer_step_was_skipped
    assert make_accelerator(torch.device("cpu"), None).scaler is None  # the next run's precision, same process


# --- the optimizer builder -----------------------------------------------------------------------------------


def test_no_decay_by_module_type_not_by_parameter_name():
    import torch

    from tasks.training import TrainConfig, param_groups

    class ScaleOnlyRMSNorm(torch.nn.Module):  # a family's own norm class, its weight called `scale`
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(4))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.ln = torch.nn.LayerNorm(4)  # named neither LayerNorm nor layer_norm
            self.post = ScaleOnlyRMSNorm()
            self.layernorm_like = torch.nn.Linear(4, 4, bias=False)  # a name that fooled the old substring rule

    net = Net()
    decay, no_decay = param_groups(net, TrainConfig(weight_decay=0.1))
    names = {id(p): n for n, p in net.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["layernorm_like.weight", "proj.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["ln.bias", "ln.weight", "post.scale", "proj.bias"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


# --- helpers: tiny classify and MLM runs ---------------------------------------------------------------------


def classify_cfg(csv, model, out, engine="manual", **train):
    return ClassifyConfig.model_validate({
        "engine": engine,
        "data": {"dataset": csv, "text_column": "review", "label_column": "sentiment", "max_length": 16,
                 "eval_fraction": 0.25},
        "train": {"model": model, "freeze_embeddings": False, "dropout": None, "group_by_length": False,
                  "epochs": 2, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0,
                  "output_dir": str(out), **train},
    })


def prepared_classify(cfg):
    from tasks.data import prepare_dataset
    from tasks.tokenize import tokenize_dataset

    data = prepare_dataset(cfg.data, cfg.train.seed)
    return cfg.spec(data.label_names), tokenize_dataset(data.path, cfg.train.model, cfg.data.max_length)


@pytest.fixture
def mlm_corpus(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(["this is a great movie !", "the cat sat on the mat .", "a dull and long film"] * 40))
    return str(p)


def prepared_mlm(corpus, model, out, engine="manual", **train):
    from tasks.data import prepare_dataset
    from tasks.mlm_data import tokenize_for_mlm

    cfg = MLMConfig(engine=engine, group_texts=False,
                    data={"dataset": corpus, "max_length": 16, "eval_fraction": 0.2, "eval_samples": 16},
                    train={"model": model, "freeze_embeddings": False, "dropout": None, "group_by_length": False,
                           "epochs": 2, "batch_size": 8, "eval_batch_size": 32, "learning_rate": 1e-2,
                           "output_dir": str(out), "seed": 0, **train})
    data = prepare_dataset(cfg.data, cfg.train.seed)
    return cfg.spec(), tokenize_for_mlm(data.path, model, 16, False, 0.15, cfg.train.seed)


def with_train(spec, **update):
    return spec.model_copy(update={"train": spec.train.model_copy(update=update)})


# --- gradient accumulation -------------------------------------------------------------------------------------


def test_steps_per_epoch_and_warmup_count_global_batches_with_accumulation():
    """36 rows, batch 4, 2 accumulated batches: 9 batches make 5 optimizer steps (the last group is one batch);
    with 2 processes each takes 5 batches, 3 steps. Warmup is a share of those steps, and the Trainer engine gets
    the same accumulation and warmup."""
    import torch

    from tasks.training import TrainConfig, global_steps_per_epoch, hf_training_kwargs, optimizer_steps, warmup_steps

    t = TrainConfig(batch_size=4, gradient_accumulation_steps=2, epochs=2, warmup_ratio=0.1)
    assert global_steps_per_epoch(36, t, 1) == optimizer_steps(9, 2) == 5
    assert global_steps_per_epoch(36, t, 2) == 3
    assert global_steps_per_epoch(36, t.model_copy(update={"gradient_accumulation_steps": 1}), 2) == 5
    assert warmup_steps(t, 5) == 1 and warmup_steps(t.model_copy(update={"warmup_ratio": 0.5}), 3) == 3
    kw = hf_training_kwargs(t, 5, torch.device("cpu"), None)
    assert kw["gradient_accumulation_steps"] == 2 and kw["warmup_steps"] == 1
    assert kw["per_device_train_batch_size"] == 4


@pytest.mark.parametrize("engine", ["manual", "trainer"])
def test_two_accumulated_batches_of_4_train_the_weights_of_batches_of_8(engine, sentiment_csv, tiny_model_dir,
                                                                      tmp_path, isolated):
    """fp32, no dropout, the same sample order: batch 4 x 2 accumulated batches ends with the weights of batch 8 x
    1, in both engines (36 rows: the epoch's last group is one batch of 4, as batch 8's last batch is 4 rows), and
    both count 5 optimizer steps an epoch."""
    from safetensors.torch import load_file

    from tasks.training import train

    common = dict(precision="fp32", dropout=0.0, select="last", warmup_ratio=0.2, learning_rate=5e-3)
    spec4, tokenized = prepared_classify(classify_cfg(sentiment_csv, tiny_model_dir, tmp_path / "o", engine,
                                                      batch_size=4, gradient_accumulation_steps=2, **common))
    spec8 = with_train(spec4, batch_size=8, gradient_accumulation_steps=1)
    r4 = train(spec4, tokenized, str(tmp_path / "acc"))
    r8 = train(spec8, tokenized, str(tmp_path / "big"))
    assert r4.steps_per_epoch == r8.steps_per_epoch == 5
    w4, w8 = (load_file(f"{r.model_dir}/model.safetensors") for r in (r4, r8))
    w0 = load_file(f"{tiny_model_dir}/model.safetensors")
    assert w4.keys() == w8.keys()
    for k in w4:
        assert torch_allclose(w4[k], w8[k]), k
    moved = [k for k in w4 if k in w0 and not torch_allclose(w4[k], w0[k])]
    assert moved  # it trained: the comparison is not between two untouched models
    for a, b in zip(r4.history, r8.history):
        assert math.isclose(a["eval_loss"], b["eval_loss"], rel_tol=1e-4), (a, b)


def torch_allclose(a, b) -> bool:
    import torch

    return torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)


# --- masks per rank, resume ------------------------------------------------------------------------------------


def test_masks_differ_per_rank_and_rank_0_masks_as_one_process(mlm_corpus, tiny_model_dir, tmp_path):
    """Same examples in the same order on every rank's loader (before sharding), other masks on rank 1; rank 0 draws
    what a single process draws. The Trainer engine takes its collator from the same `spec_for_rank`."""
    from tasks.training import build_loaders, spec_for_rank

    spec, tokenized = prepared_mlm(mlm_corpus, tiny_model_dir, tmp_path / "o")
    one, r0, r1 = (next(iter(build_loaders(tokenized, spec, rank=r)["train"])) for r in (None, 0, 1))
    assert all(bool((one[k] == r0[k]).all()) for k in one)
    assert bool((one["labels"] != r1["labels"]).any())
    assert spec_for_rank(spec, 0) is spec and spec_for_rank(spec, 1).train.seed != spec.train.seed


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resumed_mlm_run_equals_the_uninterrupted_one(accumulation, mlm_corpus, tiny_model_dir, tmp_path):
    """Killed mid-epoch 2 (after a step checkpoint), resumed: the same losses as without the interruption, which
    needs the masking collator's generator from the checkpoint (the skipped batches are not collated again). With
    gradient accumulation the checkpoint lands after an optimizer step, mid-epoch, and the resumed epoch starts at
    the next group's first batch."""
    from tasks.training import train

    spec, tokenized = prepared_mlm(mlm_corpus, tiny_model_dir, tmp_path / "o", checkpoint_every_steps=4,
                                   logging_steps=1, gradient_accumulation_steps=accumulation)
    full = train(spec, tokenized, str(tmp_path / "full"))
    per_epoch = full.steps_per_epoch
    crash_at = per_epoch + per_epoch // 2 + 1  # epoch 2, after the checkpoint at a multiple of 4

    def crash(metrics, step):
        if step == crash_at:
            raise Boom(f"killed at step {step}")

    with pytest.raises(Boom):
        train(spec, tokenized, str(tmp_path / "cut"), on_step=crash)
    from tasks.checkpoint import load_latest_checkpoint

    _, st = load_latest_checkpoint(tmp_path / "cut" / "checkpoints")
    assert st["step"] % 4 == 0 and st["step"] > per_epoch and st["epoch"] == 2
    assert st["batches_done"] == (st["step"] - per_epoch) * accumulation  # mid-epoch, after a group's last batch
    res = train(with_train(spec, resume=True), tokenized, str(tmp_path / "cut"))
    assert res.resumed_from
    for a, b in zip(full.history, res.history):
        assert a["epoch"] == b["epoch"]
        for k in ("train_loss", "eval_loss"):
            if k in a or k in b:  # epoch 0 (evaluation before training) has no train loss
                assert math.isclose(a[k], b[k], rel_tol=1e-5), (k, a, b)


def test_a_resumed_sft_mlm_run_equals_the_uninterrupted_one(mlm_corpus, tiny_model_dir, tmp_path):
    """The SFTTrainer engine resumes at an epoch's checkpoint (Trainer's own): the run's state at epoch 1's
    checkpoint (copied from an uninterrupted run, as a run killed after it leaves it) resumed ends as the
    uninterrupted run, which needs the masking collator's generator saved with Trainer's checkpoint (Trainer saves
    the global RNGs only)."""
    import shutil

    from tasks.training import train

    spec, tokenized = prepared_mlm(mlm_corpus, tiny_model_dir, tmp_path / "o", "sft", select="last")
    full = train(spec, tokenized, str(tmp_path / "full"))
    first = tmp_path / "full" / "trainer" / f"checkpoint-{full.steps_per_epoch}"
    assert (first / "collator_rng_0.pt").exists()
    shutil.copytree(first, tmp_path / "cut" / "trainer" / first.name)
    shutil.copy(tmp_path / "full" / "epoch0_metrics.json", tmp_path / "cut")
    res = train(with_train(spec, resume=True), tokenized, str(tmp_path / "cut"))
    assert res.resumed_from and [r["epoch"] for r in res.history] == [r["epoch"] for r in full.history] == [0, 1, 2]
    for a, b in zip(full.history, res.history):
        for k in ("train_loss", "eval_loss"):
            if k in a or k in b:
                assert math.isclose(a[k], b[k], rel_tol=1e-5), (k, a, b)


def test_fp16_with_loss_scaling_runs_and_resumes_on_the_cpu(sentiment_csv, tiny_model_dir, tmp_path, isolated):
    """The GPU's fp16 path (autocast fp16, scaled backward, unscale, skipped steps) on the CPU: it trains, the
    scaler's state is checkpointed, and a run resumed after epoch 1 ends as the uninterrupted one. Not covered here:
    fp16 kernels' own overflow behaviour on a GPU."""
    import torch

    from tasks.checkpoint import load_latest_checkpoint
    from tasks.training import train

    spec, tokenized = prepared_classify(classify_cfg(sentiment_csv, tiny_model_dir, tmp_path / "o",
                                                     precision="fp16", learning_rate=5e-3))
    full = train(spec, tokenized, str(tmp_path / "full"))
    assert "float16" in full.device and all(math.isfinite(r["train_loss"]) for r in full.history)
    path, st = load_latest_checkpoint(tmp_path / "full" / "checkpoints")
    assert torch.load(path / "scaler.pt", weights_only=True)["scale"] > 0 and st["world_size"] == 1
    assert (path / "random_states_0.pkl").exists() and not (path / "random_states_1.pkl").exists()

    def crash(metrics, step):
        if step == 1:
            raise Boom("killed after epoch 1")

    with pytest.raises(Boom):
        train(spec, tokenized, str(tmp_path / "cut"), on_metrics=crash)
    res = train(with_train(spec, resume=True), tokenized, str(tmp_path / "cut"))
    assert res.resumed_from and [r["epoch"] for r in res.history] == [1, 2]
    assert res.final["eval_loss"] == pytest.approx(full.final["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("per_rank", [True, False], ids=["every-rank-rng", "one-rng"])
def test_a_checkpoint_of_the_single_file_format_resumes(per_rank, sentiment_csv, tiny_model_dir, tmp_path,
                                                         isolated):
    """Checkpoints written before save_state (one `state.pt`, tests/legacy_checkpoint.py: the same keys, types and
    shapes as a checkpoint written by that code, compared once by hand) resume: the format with every rank's RNG
    state, and the one before it (one RNG state, no scaler, no world size: the keys of the pre-accelerate loop's
    checkpoints, commit 3ae0c12). With another gradient accumulation they are refused in one line that names the
    setting to use."""
    from tests.legacy_checkpoint import to_single_file

    from tasks.checkpoint import STATE, load_latest_checkpoint
    from tasks.training import train

    spec, tokenized = prepared_classify(classify_cfg(sentiment_csv, tiny_model_dir, tmp_path / "o", epochs=2))

    def crash(metrics, step):
        if step == 1:
            raise Boom("killed after epoch 1")

    with pytest.raises(Boom):
        train(spec, tokenized, str(tmp_path / "cut"), on_metrics=crash)
    path, _ = load_latest_checkpoint(tmp_path / "cut" / "checkpoints")
    to_single_file(path, per_rank=per_rank)
    assert sorted(f.name for f in path.iterdir()) == ["COMPLETE.json", STATE]
    # its config has no gradient_accumulation_steps: it counted single batches, and says so to a run that would not
    with pytest.raises(ConfigError, match=r"resume with --gradient-accumulation-steps 1 \(or start afresh"):
        train(with_train(spec, resume=True, gradient_accumulation_steps=2), tokenized, str(tmp_path / "cut"))
    res = train(with_train(spec, resume=True), tokenized, str(tmp_path / "cut"))
    assert res.resumed_from == str(path) and [r["epoch"] for r in res.history] == [1, 2]


def cut_classify_run(sentiment_csv, tiny_model_dir, tmp_path, **train_opts):
    """A classify run (9 optimizer steps an epoch, a checkpoint every 4 and at each epoch's end) killed after epoch
    1: its checkpoints are steps 8 and 9 (the default keeps two)."""
    from tasks.training import train

    spec, tokenized = prepared_classify(classify_cfg(sentiment_csv, tiny_model_dir, tmp_path / "o",
                                                     checkpoint_every_steps=4, **train_opts))

    def crash(metrics, step):
        if step == 1:
            raise Boom("killed after epoch 1")

    with pytest.raises(Boom):
        train(spec, tokenized, str(tmp_path / "cut"), on_metrics=crash)
    ckpts = sorted((tmp_path / "cut" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-00000008", "step-00000009"]
    return spec, tokenized, ckpts


def test_a_checkpoint_is_accelerates_folder_and_a_corrupt_one_falls_back(sentiment_csv, tiny_model_dir, tmp_path,
                                                                         isolated, caplog):
    """A checkpoint is the folder Accelerator.save_state writes (model, optimizer, this process's RNG states) plus
    the loop's own files and a marker with every file's sha256; a corrupted optimizer.bin makes resume skip that
    checkpoint with a warning and resume from the previous one. Before anything loads, a checkpoint of another
    gradient accumulation or number of processes is refused in one line."""
    import shutil

    from tasks.checkpoint import MARKER, _sha256, safe_load, write_state_file
    from tasks.training import train

    spec, tokenized, (older, newest) = cut_classify_run(sentiment_csv, tiny_model_dir, tmp_path, precision="fp32")
    names = {f.name for f in newest.iterdir()}
    assert names == {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "loop_state.pt", "loop_rng_0.pt",
                     MARKER}
    assert set(json.loads((newest / MARKER).read_text())["files"]) == names - {MARKER}
    assert not list(newest.parent.glob(".*"))  # no staging folder left
    own = safe_load(newest / "loop_state.pt")  # the loop's state loads with weights_only=True
    assert (own["epoch"], own["batches_done"], own["step"], own["world_size"]) == (2, 0, 9, 1)
    # the checks before anything loads: another gradient accumulation, another number of processes
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=1, this run has 2: resume with "):
        train(with_train(spec, resume=True, gradient_accumulation_steps=2), tokenized, str(tmp_path / "cut"))
    two = tmp_path / "two" / "checkpoints" / newest.name
    shutil.copytree(newest, two)
    write_state_file(two / "loop_state.pt", {**own, "world_size": 2})
    marker = json.loads((two / MARKER).read_text())
    (two / MARKER).write_text(json.dumps({**marker, "files": {**marker["files"],
                                                              "loop_state.pt": _sha256(two / "loop_state.pt")}}))
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\), this run has 1: resume with --nproc-per-node"):
        train(with_train(spec, resume=True), tokenized, str(tmp_path / "two"))
    opt = newest / "optimizer.bin"
    data = bytearray(opt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    opt.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        res = train(with_train(spec, resume=True), tokenized, str(tmp_path / "cut"))
    assert any("step-00000009" in r.getMessage() and "optimizer.bin: checksum mismatch" in r.getMessage()
               for r in caplog.records), caplog.text
    assert res.resumed_from == str(older) and [r["epoch"] for r in res.history] == [1, 2]


def test_a_missing_or_unloadable_rng_file_is_not_silent(sentiment_csv, tiny_model_dir, tmp_path, isolated, caplog):
    """accelerate's load_state goes on with the current RNG when a process's random_states_{rank}.pkl does not load
    (it says so at info level only). Missing from a checkpoint, the file makes it incomplete: skipped with a warning
    that names it. Present but not loadable the way accelerate loads it (an object weights_only refuses): the run
    resumes from it and warns that this process draws other random numbers than the interrupted run would have."""
    import random
    import shutil

    import numpy as np
    import torch

    from tasks.checkpoint import MARKER, _sha256, load_latest_checkpoint
    from tasks.training import train

    spec, tokenized, (older, newest) = cut_classify_run(sentiment_csv, tiny_model_dir, tmp_path)
    kept = tmp_path / "kept"
    shutil.copytree(newest, kept)
    (newest / "random_states_0.pkl").unlink()
    with caplog.at_level("WARNING"):
        assert load_latest_checkpoint(newest.parent)[0] == older
    assert "random_states_0.pkl is missing" in caplog.text and "step-00000009" in caplog.text
    shutil.rmtree(newest)
    shutil.copytree(kept, newest)
    bad = newest / "random_states_0.pkl"
    # numpy's RandomState object needs full unpickling: refused by weights_only, as accelerate loads the file
    torch.save({"random_state": random.getstate(), "numpy_random_seed": np.random.RandomState(0),
                "torch_manual_seed": torch.get_rng_state()}, bad)
    marker = json.loads((newest / MARKER).read_text())
    marker["files"][bad.name] = _sha256(bad)
    (newest / MARKER).write_text(json.dumps(marker))
    caplog.clear()
    with caplog.at_level("WARNING"):
        res = train(with_train(spec, resume=True), tokenized, str(tmp_path / "cut"))
    assert res.resumed_from == str(newest)
    [warning] = [r.getMessage() for r in caplog.records if "random_states_0.pkl" in r.getMessage()]
    assert "does not load" in warning and "Unsupported global" in warning and "draws other random numbers" in warning


def test_a_diverging_run_stops_with_one_line(sentiment_csv, tiny_model_dir, tmp_path, isolated):
    from tasks.training import train
    from tasks.training.loop import TrainingDiverged

    spec, tokenized = prepared_classify(classify_cfg(sentiment_csv, tiny_model_dir, tmp_path / "o",
                                                     learning_rate=1e30, max_grad_norm=1e30, epochs=1))
    with pytest.raises(TrainingDiverged, match=r"not finite at optimizer step \d+; try a lower --learning-rate") as e:
        train(spec, tokenized, str(tmp_path / "run"))
    assert isinstance(e.value, ConfigError) and "\n" not in str(e.value)
    assert not (tmp_path / "run" / "model").exists()


# --- the ranks import no Prefect ------------------------------------------------------------------------------


def test_a_rank_trains_without_importing_prefect(sentiment_csv, tiny_model_dir, tmp_path, isolated):
    """The rank entry point (`python -m tasks.distributed`, what torchrun starts) run as a rank of a 1-process group
    in a fresh interpreter: it trains, writes its result, and neither it nor the modules a rank uses to read data
    and log metrics (tasks.data, tasks.tokenize, tasks.tracking, the job recipes) load Prefect."""
    import os
    import socket
    import subprocess
    import sys

    spec, tokenized = prepared_classify(classify_cfg(sentiment_csv, tiny_model_dir, tmp_path / "o", epochs=1))
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    run, result = tmp_path / "run", tmp_path / "run" / "distributed" / "result.json"
    result.parent.mkdir(parents=True)
    code = "\n".join([
        "import runpy, sys",
        "sys.argv = ['tasks.distributed', *sys.argv[1:]]",
        "try:",
        "    runpy.run_module('tasks.distributed', run_name='__main__', alter_sys=True)",
        "except SystemExit as e:",
        "    assert not e.code, e.code",
        "import tasks.data, tasks.tokenize, tasks.tracking, tasks.jobs.classify, tasks.jobs.mlm, tasks.training",
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect')[:3])",
    ])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    out = subprocess.run([sys.executable, "-c", code, "--spec", str(tmp_path / "spec.json"), "--tokenized", tokenized,
                          "--run-dir", str(run), "--result", str(result)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-500:]
    assert (run / "model" / "model.safetensors").exists() and json.loads(result.read_text())["history"]


# --- 2 gloo processes: warmup and steps per epoch from the global batch, both engines --------------------------


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["manual", "trainer"])
def test_warmup_and_steps_per_epoch_count_global_batches_under_torchrun(engine, sentiment_csv, tiny_model_dir,
                                                                        tmp_path, isolated):
    """2 processes x batch 4 x 2 accumulated batches: an epoch is ceil(ceil(rows / 8) / 2) optimizer steps in both
    engines (each rank's ceil(rows / 8) batches, two to a step), and warmup (half of all steps here) peaks at the
    end of epoch 1, not after N (or k) times as many steps."""
    from datasets import load_from_disk

    from tasks.training import train

    spec, tokenized = prepared_classify(classify_cfg(
        sentiment_csv, tiny_model_dir, tmp_path / "o", engine, warmup_ratio=0.5, nproc_per_node=2, logging_steps=1,
        precision="fp32", gradient_accumulation_steps=2))
    rows = len(load_from_disk(tokenized)["train"])
    res = train(spec, tokenized, str(tmp_path / "run"))
    per_epoch = math.ceil(math.ceil(rows / 8) / 2)
    assert res.steps_per_epoch == per_epoch == 3 and "2 processes" in res.device
    lr = spec.train.learning_rate
    if engine == "manual":
        from tasks.checkpoint import safe_load

        ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
        states = [safe_load(c / "loop_state.pt")["scheduler"] for c in ckpts]
        assert [s["last_epoch"] for s in states] == [per_epoch, 2 * per_epoch]
        assert states[0]["_last_lr"][0] == pytest.approx(lr) and states[1]["_last_lr"][0] == pytest.approx(0.0)
    else:
        last = sorted((tmp_path / "run" / "trainer").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
        state = json.loads((last / "trainer_state.json").read_text())
        assert state["global_step"] == state["max_steps"] == 2 * per_epoch
        lrs = {e["step"]: e["learning_rate"] for e in state["log_history"] if "learning_rate" in e}
        peak = max(lrs, key=lrs.get)
        assert peak == per_epoch + 1 or peak == per_epoch, lrs  # the lr logged after step s is the next step's
        assert lrs[peak] == pytest.approx(lr, rel=0.2)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["manual", "sft"])
def test_mlm_under_two_gloo_processes_masks_per_rank_and_resumes(engine, mlm_corpus, tiny_model_dir, tmp_path):
    """MLM with 2 processes x batch 4 x 2 accumulated batches (global batch 16) in both engines: it trains (finite
    losses, an epoch of global batches); every rank's masking generator is checkpointed and the two ranks' differ
    (dropout's too, in the plain loop); and the run's state at a checkpoint (copied from the uninterrupted run, as a
    run killed after it leaves it) resumed under 2 processes ends as the uninterrupted run. Plain loop: the
    checkpoint is mid-epoch 2, after an optimizer step; SFTTrainer checkpoints per epoch: epoch 1's."""
    import shutil

    import torch
    from datasets import load_from_disk

    from tasks.checkpoint import load_latest_checkpoint, safe_load
    from tasks.training import train

    spec, tokenized = prepared_mlm(mlm_corpus, tiny_model_dir, tmp_path / "o", engine, nproc_per_node=2,
                                   precision="fp32", batch_size=4, gradient_accumulation_steps=2,
                                   checkpoint_every_steps=4, select="last")
    full_dir, cut = tmp_path / "full", tmp_path / "cut"
    full = train(spec, tokenized, str(full_dir))
    per_epoch = math.ceil(math.ceil(len(load_from_disk(tokenized)["train"]) / 8) / 2)
    assert full.steps_per_epoch == per_epoch and "2 processes" in full.device
    assert all(math.isfinite(v) for r in full.history for v in r.values())
    cut.mkdir()
    shutil.copy(full_dir / "epoch0_metrics.json", cut)
    if engine == "manual":
        from accelerate.utils import load

        path, st = load_latest_checkpoint(full_dir / "checkpoints")
        # accelerate's layout, each process's RNG file written by that process, and the loop's per-process file
        assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "loop_rng_0.pt",
                "loop_rng_1.pt", "loop_state.pt"} <= {f.name for f in path.iterdir()}
        r0, r1 = (safe_load(path / f"loop_rng_{r}.pt") for r in (0, 1))
        assert st["world_size"] == 2 and r0["collator"] and r1["collator"]
        assert not bool((r0["collator"][0] == r1["collator"][0]).all())
        g0, g1 = (load(path / f"random_states_{r}.pkl")["torch_manual_seed"] for r in (0, 1))
        assert not bool((g0 == g1).all())  # dropout draws differ too
        mid = sorted((full_dir / "checkpoints").glob("step-*"))[-2]
        at = safe_load(mid / "loop_state.pt")
        assert at["epoch"] == 2 and at["batches_done"] == (at["step"] - per_epoch) * 2 > 0
        shutil.copytree(mid, cut / "checkpoints" / mid.name)
    else:
        first = full_dir / "trainer" / f"checkpoint-{per_epoch}"
        g0, g1 = (torch.load(first / f"collator_rng_{r}.pt", weights_only=True)[0] for r in (0, 1))
        assert not bool((g0 == g1).all())
        shutil.copytree(first, cut / "trainer" / first.name)
    res = train(with_train(spec, resume=True), tokenized, str(cut))
    assert res.resumed_from and [r["epoch"] for r in res.history] == [r["epoch"] for r in full.history] == [0, 1, 2]
    for a, b in zip(full.history, res.history):
        for k in ("train_loss", "eval_loss"):
            if k in a or k in b:
                assert math.isclose(a[k], b[k], rel_tol=1e-5), (k, a, b)


def test_a_diverging_trainer_run_stops_with_one_line_too(sentiment_csv, tiny_model_dir, tmp_path, isolated):
    from tasks.training import train
    from tasks.training.loop import TrainingDiverged

    spec, tokenized = prepared_classify(classify_cfg(sentiment_csv, tiny_model_dir, tmp_path / "o", "trainer",
                                                     learning_rate=1e30, max_grad_norm=1e30, epochs=1,
                                                     logging_steps=1))
    with pytest.raises(TrainingDiverged, match=r"not finite at optimizer step \d+"):
        train(spec, tokenized, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "model").exists()
