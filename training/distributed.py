"""Data-parallel EliGen training under PyTorch's own launcher (``torchrun``) and ``torch.distributed``.

- ``init_from_environment`` joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR...): gloo on CPU, nccl on GPUs (each rank on ``cuda:LOCAL_RANK``).
- ``encode_shared``: the encoding cache lives on disk, shared by all ranks. Every cache entry (a latent,
  a prompt) is owned by one rank (its key modulo the world size); each rank first encodes only the
  entries it owns that are missing, then all wait, then every rank reads the whole dataset from disk.
  So nothing is computed twice, and a second run encodes nothing.
- ``Group.reduce_step`` sums the LoRA gradients (float64) and the loss of a step over ranks. The loop
  (training/loop.py) divides each rank's loss by the size of the whole step's batch, so the sum is the
  mean over all samples, what one process with the whole batch computes.
"""

import datetime
import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..core import host
from .cache import EncodingCache, encode_dataset

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


@dataclass
class Group:
    rank: int
    world: int
    local_rank: int
    backend: str
    device: torch.device
    fsdp: bool = False  # shard the frozen base weights over the ranks (shard_frozen_base)

    @property
    def is_writer(self):
        """Only rank 0 writes checkpoints, the LoRA, the loss graph and the run's images."""
        return self.rank == 0

    def barrier(self):
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def reduce_step(self, gradients, loss):
        """Sum a step's gradients (a loop.GradientSum, float64) and ``loss`` (a float) over ranks, in
        place; returns the summed loss. A parameter no rank reached keeps ``grad = None``."""
        seen = torch.tensor(gradients.seen.tolist() + [False], dtype=torch.float64, device=self.device)
        seen[-1] = loss
        dist.all_reduce(seen)
        gradients.seen = seen[:-1].cpu() > 0
        if gradients.total is not None:
            total = gradients.total.to(self.device)
            dist.all_reduce(total)
            gradients.total = total
        return float(seen[-1])

    def shard_frozen_base(self, module, trainable):
        """FSDP2 (``fully_shard``) on every module that owns frozen weights, so each rank keeps 1/world of
        the base and gathers a layer's weights only while that layer runs (forward, backward, recompute).
        Sharding the leaves, not the blocks, because the training blocks (core/blocks.py) call a block's
        sub-modules directly, never the block's own forward. The LoRA tensors (``trainable``) stay whole
        on every rank (``ignored_params``) and are averaged by ``reduce_step`` as without FSDP."""
        from torch.distributed.device_mesh import init_device_mesh  # FSDP: imported only when sharding
        from torch.distributed.fsdp import fully_shard

        # FSDP warns that a Linear returns a view (an in-place op on it would skip the gather); the training
        # blocks (core/blocks.py) are out of place, so it does not apply.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(self.device.type, (self.world,))
        keep = {id(p) for p in trainable}
        sharded = 0
        for owner in list(module.modules()):
            own = [p for p in owner.parameters(recurse=False) if id(p) not in keep]
            if own:
                fully_shard(owner, mesh=mesh, reshard_after_forward=True,
                            ignored_params={p for p in owner.parameters(recurse=False) if id(p) in keep})
                sharded += 1
        for p in trainable:  # the LoRA was made beside the weights (still on the CPU when sharding on GPUs)
            p.data = p.data.to(self.device)
        return sharded

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()


def init_from_environment(device="cpu", timeout_minutes=120):
    """The Group of this process when started by torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if device not in BACKENDS:
        raise ValueError(f"device {device!r}: distributed training runs on cpu (gloo) or cuda (nccl)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch_device = host.memory.select_cuda_device(local_rank)
    else:
        torch_device = torch.device("cpu")
    # The encoding phase keeps other ranks waiting at a barrier: allow it a long time.
    dist.init_process_group(BACKENDS[device], timeout=datetime.timedelta(minutes=timeout_minutes))
    return Group(dist.get_rank(), dist.get_world_size(), local_rank, BACKENDS[device], torch_device)


# ---------------------------------------------------------------------------------------------------
# The shared encoding cache

_ELSEWHERE = {"latent": torch.zeros(0), "cond": torch.zeros(0)}  # stands in for entries not encoded here


def owner_of(key, world):
    """The rank that encodes the cache entry ``key`` (a sha256 hex digest)."""
    return int(key[:16], 16) % world


class OwnedEntriesCache(EncodingCache):
    """The first pass of ``encode_shared``: encodes (and writes) only the missing entries this rank owns;
    entries on disk or owned by another rank are answered with a placeholder and never read."""

    def __init__(self, directory, rank, world):
        super().__init__(directory, keep_in_memory=False)
        self.rank, self.world = rank, world

    def get(self, kind, key):
        if os.path.exists(self._path(kind, key)) or owner_of(key, self.world) != self.rank:
            return _ELSEWHERE
        self.misses += 1
        return None


def encode_shared(dataset, vae, clip, group, cache_dir, **options):
    """``encode_dataset`` under torchrun: (samples, the cache of the second pass, the first pass's cache)."""
    if not cache_dir:
        raise ValueError("distributed training needs a disk cache folder shared by all ranks")
    first = OwnedEntriesCache(cache_dir, group.rank, group.world)
    encode_dataset(dataset, vae, clip, cache=first, **options)
    group.barrier()  # every entry is on disk now
    cache = EncodingCache(cache_dir)
    samples = encode_dataset(dataset, vae, clip, cache=cache, **options)
    if any(cache.encoder_calls.values()):
        logging.warning("EliGen training (rank %d): %s encoded again after the shared pass (an unreadable "
                        "cache file?)", group.rank, cache.encoder_calls)
    return samples, cache, first
