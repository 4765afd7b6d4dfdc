"""Which training samples each process draws, and how their augmentation is seeded.

`ShardSampler` gives each process a disjoint shard per epoch and can resume inside an epoch,
with the same world size or another. With `data.workers > 0`, a fresh DataLoader seeds its
workers anew, so a resumed epoch would draw other augmentations than the interrupted one; to
make a resume exact, the sampler's indices are tagged with the epoch and each worker seeds its
random generators from (seed, epoch, the batch's first index) before loading that batch. Without workers, the
main process's generators are used as they are (they are in every checkpoint), seeded per
process by `seed_process_streams`.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler, get_worker_info


def seed_process_streams(seed: int, rank: int) -> None:
    """This process's training streams (torch, Python, NumPy) from (seed, rank), as timm's train.py does:
    after the model is built from the shared seed, dropout, drop-path and main-process augmentation draw
    differently on each process, and the same on every run with this seed and world size."""
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)


class ShardSampler(DistributedSampler):
    """DistributedSampler(shuffle=True, drop_last=True), and resumable inside an epoch.

    `skip(consumed)` leaves out the epoch's first `consumed` samples, which every process together
    had drawn when stopped (each process's shard is strided over one permutation), so the rest of
    the epoch is seen exactly once, with this world size or another. With the same world size it
    continues each process's own sequence exactly.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.consumed = 0
        self._cache: tuple[tuple, list[int]] | None = None  # len() and iter() share one permutation per epoch

    def skip(self, consumed: int) -> None:
        self.consumed = consumed

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.consumed = 0

    def _order(self) -> list[int]:
        key = (self.epoch, self.consumed)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._compute_order())
        return self._cache[1]

    def _compute_order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=g).tolist()
        if self.consumed:
            used = set(order[: self.consumed])  # what the old processes' strided shards had drawn
            order = [i for i in order if i not in used]
        return order[: len(order) - len(order) % self.num_replicas]

    def __iter__(self):
        return iter(self._order()[self.rank:: self.num_replicas])

    def __len__(self) -> int:
        return len(self._order()) // self.num_replicas


class EpochTagged(Sampler):
    """Yields (epoch, index) from a ShardSampler, for SeededAugmentation."""

    def __init__(self, sampler: ShardSampler):
        self.sampler = sampler

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def _seed_streams(key: str) -> None:
    """Seed this worker's generators (torch's CPU stream, Python's, NumPy's) from `key`."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    h = int.from_bytes(digest, "little") >> 1
    # the CPU stream transforms draw from; torch.manual_seed also queues every accelerator's seed (0.25 ms)
    torch.default_generator.manual_seed(h)
    random.seed(h)
    np.random.seed(h % 2**32)


class SeededAugmentation(Dataset):
    """In a worker, each batch's augmentation is seeded from (seed, epoch, its first index, its size): the
    DataLoader fetches a batch at once (`__getitems__`), so the seeding (about 25 us) is paid once a batch,
    not once a sample. A batch is fixed by the sampler's position, so a resumed epoch, which skips whole
    batches, draws what the interrupted one drew, whatever the number of workers."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if get_worker_info() is not None:  # a worker's generators are its own; the main process's are checkpointed
            _seed_streams(f"{self.seed}/{epoch}/{index}")
        return self.dataset[index]

    def __getitems__(self, keys: list) -> list:
        if get_worker_info() is not None:
            _seed_streams(f"{self.seed}/{keys[0][0]}/{keys[0][1]}/{len(keys)}")
        return [self.dataset[index] for _, index in keys]
