"""Build PyTorch DataLoaders from a tokenized dataset on disk (wrapped as a task by `tasks.training.build_loaders`:
the loaders stay in the flow's process and go to training in memory, the one deliberate exception to passing
paths)."""
from __future__ import annotations

from tasks.base_model import resolve_model


def build_dataloaders(
    tokenized_path: str,
    model: str,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    pad_to_max_length: bool = False,
    collator=None,
    group_by_length: bool = False,
) -> dict:
    """Seeded shuffle for train; dynamic padding per batch unless everything was padded to max_length.
    `collator` (e.g. the MLM masking collator) replaces the padding collator. `group_by_length`: transformers'
    LengthGroupedSampler (shuffled, then sorted by length within mega-batches of 50 batches) drawing from the same
    seeded generator, so a resumed epoch replays the same batches; with dynamic padding, batches of similar lengths
    pad little."""
    import torch
    from datasets import load_from_disk
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer, DataCollatorWithPadding, default_data_collator

    dd = load_from_disk(tokenized_path)
    dd.set_format("torch")
    if collator is None:
        collator = (
            default_data_collator
            if pad_to_max_length
            else DataCollatorWithPadding(AutoTokenizer.from_pretrained(resolve_model(model)))
        )
    gen = torch.Generator().manual_seed(seed)
    if group_by_length and not pad_to_max_length:
        from transformers.trainer_pt_utils import LengthGroupedSampler

        sampler = LengthGroupedSampler(batch_size, lengths=example_lengths(dd["train"]), generator=gen)
        train = DataLoader(dd["train"], batch_size=batch_size, sampler=sampler, generator=gen, collate_fn=collator)
    else:
        train = DataLoader(dd["train"], batch_size=batch_size, shuffle=True, generator=gen, collate_fn=collator)
    return {
        "train": train,
        "eval": DataLoader(dd["eval"], batch_size=eval_batch_size, shuffle=False, collate_fn=collator),
    }


def example_lengths(dataset) -> list[int]:
    """Tokens per example, read from the Arrow column (no row decoding: fast on large datasets)."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_pylist()


def epoch_seeded_length_sampler(batch_size: int, lengths: list[int], seed: int, epoch_of=None):
    """transformers' LengthGroupedSampler whose order is a function of (seed, epoch), so a resumed run replays the
    interrupted epoch's batches (Trainer's own length sampler draws from the global RNG, whose state at a mid-epoch
    checkpoint is not the epoch's start). `epoch_of()` gives the epoch under way when iteration starts (the
    Trainer's `set_epoch` does not reach a sampler behind accelerate's batch skipping on resume)."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class EpochSeeded(LengthGroupedSampler):
        epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            self.generator.manual_seed(seed + (epoch_of() if epoch_of else self.epoch))
            return super().__iter__()

    return EpochSeeded(batch_size, lengths=lengths, generator=torch.Generator())
