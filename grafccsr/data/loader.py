"""Endless, resumable batches: a seeded infinite sampler and the DataLoader settings
of the memory guide (items 2 and 5)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from grafccsr.config import MemoryConfig

MAX_LOADER_WORKERS = 4
"""Guide item 2: more workers only cost memory for a dataset held in RAM."""


class InfiniteSampler(Sampler[int]):
    """Indices in [0, num_items) forever: epoch e is ``randperm`` seeded with ``seed + e``.

    The stream is a pure function of (num_items, seed), so ``start=k`` yields the
    same indices an uninterrupted sampler yields after its first k: a resumed run
    with ``start = batches_done * batch_size`` sees exactly the batches it would have.
    """

    def __init__(self, num_items: int, seed: int, start: int = 0):
        if num_items < 1:
            raise ValueError(f"InfiniteSampler needs at least one item, got {num_items}")
        if start < 0:
            raise ValueError(f"InfiniteSampler start={start} must be >= 0")
        self.num_items = num_items
        self.seed = seed
        self.start = start

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.num_items)
        generator = torch.Generator()
        while True:
            generator.manual_seed(self.seed + epoch)
            yield from torch.randperm(self.num_items, generator=generator)[offset:].tolist()
            epoch, offset = epoch + 1, 0


def build_loader(
    dataset: Dataset,
    batch_size: int,
    memory: MemoryConfig,
    device: torch.device,
    seed: int,
    start_batch: int = 0,
) -> DataLoader:
    """An endless DataLoader of ``batch_size`` items whose first batch is batch ``start_batch``
    of the seeded stream (for exact resumption).

    Workers: ``min(memory.loader_workers, 4)``; ``prefetch_factor`` and
    ``persistent_workers`` only with workers (DataLoader rejects them otherwise);
    pinned host memory only for CUDA, where it makes ``non_blocking`` copies real.
    """
    workers = min(memory.loader_workers, MAX_LOADER_WORKERS)
    worker_options = (
        {"prefetch_factor": memory.prefetch_factor, "persistent_workers": memory.persistent_workers}
        if workers > 0
        else {}
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=InfiniteSampler(len(dataset), seed, start=start_batch * batch_size),
        num_workers=workers,
        pin_memory=memory.pin_memory and device.type == "cuda",
        drop_last=True,
        # own generator: each iter() draws a worker base seed from it, which would
        # otherwise consume the global torch RNG and shift the training's random stream
        generator=torch.Generator().manual_seed(seed),
        **worker_options,
    )
