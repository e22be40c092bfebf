"""The step-cost choices of the training core (issue 11): dropout, frozen token embeddings, the attention kernels used
while training, fused AdamW, length-grouped batches, and the temporary Prefect server launched ahead of the checks.
Speed itself is measured by bench/, never here: these tests check that each choice does what it says and keeps what
it must (evaluation on the model's own attention, seeded and resumable batches, no server left behind)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flows.config import DataConfig
from tasks.data import prepare_dataset
from tasks.loaders import build_dataloaders, example_lengths
from tasks.tokenize import tokenize_dataset
from tasks.training import (TrainConfig, attention_implementation, fused_adamw_supported, prepare_for_training,
                            training_attention)

ROOT = Path(__file__).resolve().parents[1]


def tiny_classifier(path: str):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def dropout_ps(model) -> set[float]:
    return {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}


def test_dropout_and_frozen_embeddings(tiny_model_dir):
    model = tiny_classifier(tiny_model_dir)
    assert dropout_ps(model) == {0.1}  # the checkpoint's
    prepare_for_training(model, TrainConfig(dropout=0.0, freeze_embeddings=True))
    assert dropout_ps(model) == {0.0}
    assert not model.get_input_embeddings().weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if "word_embeddings" not in n)

    kept = tiny_classifier(tiny_model_dir)
    prepare_for_training(kept, TrainConfig(dropout=None, freeze_embeddings=False))
    assert dropout_ps(kept) == {0.1} and kept.get_input_embeddings().weight.requires_grad


def test_dropout_zero_is_deterministic_in_train_mode(tiny_model_dir):
    """No masks drawn: two forward passes in train mode agree (what makes the step cheaper)."""
    model = tiny_classifier(tiny_model_dir)
    prepare_for_training(model, TrainConfig(dropout=0.0))
    model.train()
    x = torch.randint(5, 100, (2, 8))
    assert torch.equal(model(input_ids=x).logits, model(input_ids=x).logits)


def test_frozen_embeddings_stay_fixed_in_a_step(tiny_model_dir):
    model = tiny_classifier(tiny_model_dir)
    prepare_for_training(model, TrainConfig(freeze_embeddings=True))
    before = model.get_input_embeddings().weight.detach().clone()
    enc = next(p for n, p in model.named_parameters() if "encoder" in n and n.endswith("weight")).detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            fused=fused_adamw_supported(torch.device("cpu")))
    model(input_ids=torch.randint(5, 100, (2, 8)), labels=torch.tensor([0, 1])).loss.backward()
    opt.step()
    assert torch.equal(model.get_input_embeddings().weight, before)
    after = next(p for n, p in model.named_parameters() if "encoder" in n and n.endswith("weight"))
    assert not torch.equal(after, enc)  # the rest trains


def test_training_attention_rule():
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    assert training_attention(TrainConfig(), cpu, bf16) == "eager"  # fused CPU attention backward is slow in bf16
    assert training_attention(TrainConfig(), cpu, None) is None  # fp32: the model's own (sdpa)
    assert training_attention(TrainConfig(attention="sdpa"), cpu, bf16) == "sdpa"
    assert training_attention(TrainConfig(attention="eager"), cpu, None) == "eager"


def test_attention_switch_is_scoped_and_same_function(tiny_model_dir):
    """Training switches to eager and back; both kernels compute the same attention (fp32, eval mode)."""
    model = tiny_classifier(tiny_model_dir).eval()
    own = model.config._attn_implementation
    x = torch.randint(5, 100, (2, 8))
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    ref = model(input_ids=x, attention_mask=mask).logits
    with attention_implementation(model, "eager" if own != "eager" else "sdpa"):
        assert model.config._attn_implementation != own
        other = model(input_ids=x, attention_mask=mask).logits
    assert model.config._attn_implementation == own
    assert torch.allclose(ref, other, atol=1e-5)
    with attention_implementation(model, None):
        assert model.config._attn_implementation == own


@pytest.fixture
def tokenized(sentiment_csv, isolated, tiny_model_dir) -> str:
    prepared = prepare_dataset(DataConfig(dataset=sentiment_csv, text_column="review", label_column="sentiment"), seed=0)
    return tokenize_dataset(prepared.path, tiny_model_dir, 32)


def batch_lengths(loader) -> list[list[int]]:
    return [b["attention_mask"].sum(1).tolist() for b in loader]


def test_length_grouped_batches_pad_less_and_keep_every_example(tokenized, tiny_model_dir):
    from datasets import load_from_disk

    n = len(load_from_disk(tokenized)["train"])
    plain = build_dataloaders(tokenized, tiny_model_dir, 4, 8, seed=0)["train"]
    grouped = build_dataloaders(tokenized, tiny_model_dir, 4, 8, seed=0, group_by_length=True)["train"]

    def padding(loader) -> int:
        return sum(b["input_ids"].numel() - int(b["attention_mask"].sum()) for b in loader)

    assert sorted(sum(batch_lengths(grouped), [])) == sorted(sum(batch_lengths(plain), []))  # same examples
    assert sum(len(b) for b in batch_lengths(grouped)) == n
    assert padding(grouped) < padding(plain)
    assert example_lengths(load_from_disk(tokenized)["train"]) == [
        len(x) for x in load_from_disk(tokenized)["train"]["input_ids"]]


def test_length_grouped_batches_are_seeded_and_replay_from_the_generator_state(tokenized, tiny_model_dir):
    """What resume relies on: the loader's generator state at an epoch's start gives that epoch's batches again."""
    make = lambda seed: build_dataloaders(tokenized, tiny_model_dir, 4, 8, seed=seed, group_by_length=True)["train"]
    a, b = make(3), make(3)
    assert batch_lengths(a) == batch_lengths(b)
    first_ids = lambda loader: [x["input_ids"].tolist() for x in loader]
    state = a.generator.get_state()
    epoch2 = first_ids(a)
    a.generator.set_state(state)
    assert first_ids(a) == epoch2
    assert first_ids(make(4)) != first_ids(make(3))


def test_length_grouping_survives_sharding(tokenized, tiny_model_dir):
    from transformers.trainer_pt_utils import DistributedLengthGroupedSampler

    from tasks import distributed

    loaders = build_dataloaders(tokenized, tiny_model_dir, 4, 8, seed=0, group_by_length=True)
    sharded = distributed.shard_train_loader(loaders, seed=0, num_replicas=2, rank=0)
    assert isinstance(sharded["train"].sampler, DistributedLengthGroupedSampler)
    assert sharded["train"].batch_size == 4 and sharded["train"].collate_fn is loaders["train"].collate_fn


SCRIPT = """
import os, sys, time
sys.path.insert(0, {root!r})
from flows.ephemeral import begin_temporary_server, own_temporary_server, _tied_server
begin_temporary_server()
server = _tied_server()
early = server.early
print("early", early.pid, flush=True)
{then}
"""


def run_script(tmp_path: Path, then: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    return subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT), then=textwrap.dedent(then))],
                          capture_output=True, text=True, env=env, timeout=180)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the tied temporary server is Linux only")
def test_server_launched_ahead_is_the_one_used(tmp_path):
    p = run_script(tmp_path, """
        url = own_temporary_server()
        import httpx
        print("same", server.server_process.pid == early.pid, httpx.get(url + "/health").status_code, flush=True)
    """)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "same True 200" in p.stdout, out[-3000:]
    pid = int(p.stdout.split("early ")[1].split()[0])
    assert not pid_alive(pid)  # stopped at exit


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the tied temporary server is Linux only")
def test_server_launched_ahead_ends_when_unused(tmp_path):
    """A command that stops on bad input after the launch leaves no server process, and prints no server lines."""
    p = run_script(tmp_path, "sys.exit(2)")
    assert p.returncode == 2, (p.stdout + p.stderr)[-3000:]
    pid = int(p.stdout.split("early ")[1].split()[0])
    assert not pid_alive(pid)
    assert "temporary server" not in p.stdout + p.stderr


def test_trainer_length_sampler_order_is_a_function_of_seed_and_epoch():
    """The Trainer engine's length-grouped order: the same for the same (seed, epoch), however often it is drawn
    and whatever the global RNG did in between (a resumed run draws it again mid-epoch)."""
    from tasks.loaders import epoch_seeded_length_sampler

    lengths = [5, 9, 3, 12, 7, 7, 2, 11] * 8
    epoch = [0]
    s = epoch_seeded_length_sampler(4, lengths, seed=1, epoch_of=lambda: epoch[0])
    first = list(s)
    torch.rand(100)  # the global RNG moves: no effect
    assert list(s) == first and sorted(first) == list(range(len(lengths)))
    epoch[0] = 1
    second = list(s)
    assert second != first
    assert list(epoch_seeded_length_sampler(4, lengths, seed=1, epoch_of=lambda: 1)) == second
    assert list(epoch_seeded_length_sampler(4, lengths, seed=2, epoch_of=lambda: 1)) != second


def test_gpu_bench_counts_the_flops_it_times(tiny_model_dir, tmp_path, monkeypatch):
    """bench/bench_gpu.py (the prepared GPU script) runs both jobs' training step here on the CPU: FLOPs counted by
    torch over forward and backward, at least the 6 x weights x tokens of the encoder's linear layers."""
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    from bench.bench_gpu import measure

    flags = ["--model", tiny_model_dir, "--train-samples", "24", "--eval-samples", "8", "--max-length", "32"]
    for job in ("classify", "mlm"):
        r = measure(job, flags, 8, steps=2, warmup=1, device_flag="cpu")
        model = tiny_classifier(tiny_model_dir)
        linear = sum(m.weight.numel() for n, m in model.bert.encoder.named_modules() if isinstance(m, torch.nn.Linear))
        assert r["batch_size"] == 8 and r["samples_per_s"] > 0 and r["tflops_per_s"] > 0
        assert r["gflops_per_sample"] * 1e9 >= 6 * linear * r["tokens_per_sample"], r
