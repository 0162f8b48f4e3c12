"""Endless, resumable batches: a seeded infinite sampler and the DataLoader settings
of the memory guide (items 2 and 5)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from grafccsr.config import MemoryConfig
from grafccsr.data.folder import MultiViewFolder
from grafccsr.data.holdout import check_split

MAX_LOADER_WORKERS = 4
"""Guide item 2: more workers only cost memory for a dataset held in RAM."""


class InfiniteSampler(Sampler[int]):
    """Indices in [0, num_items) forever: epoch e is ``randperm`` seeded with ``seed + e``.

    The stream is a pure function of (num_items, seed), so ``start=k`` yields the
    same indices an uninterrupted sampler yields after its first k: a resumed run
    with ``start = batches_done * batch_size`` sees exactly the batches it would have.

    Several ranks (``rank`` of ``world_size``): the stream is cut into global batches of
    ``world_size * batch_size`` indices and each rank yields its own contiguous ``batch_size``
    of each, so the ranks' batches are disjoint and together are the single-process batch.
    ``start`` counts indices of the global stream.
    """

    def __init__(self, num_items: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1):
        if num_items < 1:
            raise ValueError(f"InfiniteSampler needs at least one item, got {num_items}")
        if start < 0:
            raise ValueError(f"InfiniteSampler start={start} must be >= 0")
        self.num_items = num_items
        self.seed = seed
        self.start = start
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size

    def _stream(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.num_items)
        generator = torch.Generator()
        while True:
            generator.manual_seed(self.seed + epoch)
            yield from torch.randperm(self.num_items, generator=generator)[offset:].tolist()
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[int]:
        if self.world_size == 1:
            yield from self._stream()
            return
        stream, lo = self._stream(), self.rank * self.batch_size
        while True:
            chunk = [next(stream) for _ in range(self.world_size * self.batch_size)]
            yield from chunk[lo:lo + self.batch_size]


def build_loader(
    dataset: Dataset,
    batch_size: int,
    memory: MemoryConfig,
    device: torch.device,
    seed: int,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """An endless DataLoader of ``batch_size`` items (this rank's share of a global batch of
    ``world_size * batch_size``) whose first batch is batch ``start_batch`` of the seeded
    stream (for exact resumption).

    A :class:`MultiViewFolder`'s held-out views (``data.holdout``) are never drawn: the stream
    indexes the views training may see (all of them without a holdout, the same stream as before).

    Workers: ``min(memory.loader_workers, 4)``; ``prefetch_factor`` and
    ``persistent_workers`` only with workers (DataLoader rejects them otherwise);
    pinned host memory only for CUDA, where it makes ``non_blocking`` copies real.
    """
    if isinstance(dataset, MultiViewFolder):
        check_split(dataset)
        if dataset.held_out.any():
            dataset = Subset(dataset, dataset.train_indices.tolist())
    workers = min(memory.loader_workers, MAX_LOADER_WORKERS)
    worker_options = (
        {"prefetch_factor": memory.prefetch_factor, "persistent_workers": memory.persistent_workers}
        if workers > 0
        else {}
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=InfiniteSampler(len(dataset), seed, start=start_batch * batch_size * world_size, rank=rank,
                                world_size=world_size, batch_size=batch_size),
        num_workers=workers,
        pin_memory=memory.pin_memory and device.type == "cuda",
        drop_last=True,
        # own generator: each iter() draws a worker base seed from it, which would
        # otherwise consume the global torch RNG and shift the training's random stream
        generator=torch.Generator().manual_seed(seed),
        **worker_options,
    )
