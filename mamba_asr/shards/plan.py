"""Which process and loader worker reads which shard in an epoch, deterministic from (seed,
epoch): the shard order is shuffled, then the shards are dealt in that order to the processes,
each to the process with the fewest hours so far, and a process's shards to its loader workers
the same way. The hours of any two readers differ by at most one shard's, and which reader
reads which shard changes every epoch (dealing the largest first would balance a little
better but give every process the same shards every epoch). Every shard goes to exactly one
reader; a reader may get none (more readers than shards)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from mamba_asr.shards.index import ShardInfo


def epoch_order(shards: Sequence[ShardInfo], seed: int, epoch: int) -> list[ShardInfo]:
    """``shards`` in the epoch's shuffled order."""
    order = list(shards)
    random.Random(f"shards-{seed}-{epoch}").shuffle(order)
    return order


def balance(shards: Sequence[ShardInfo], parts: int) -> list[list[ShardInfo]]:
    """``shards`` dealt in order into ``parts`` groups, each to the group with the fewest
    seconds so far (ties to the lowest part): the groups' seconds differ by at most the
    longest shard's."""
    if parts < 1:
        raise ValueError(f"cannot split shards into {parts} parts")
    totals = [0.0] * parts
    groups: list[list[ShardInfo]] = [[] for _ in range(parts)]
    for shard in shards:
        part = min(range(parts), key=lambda p: (totals[p], p))
        groups[part].append(shard)
        totals[part] += shard.seconds
    return groups


def process_shards(
    shards: Sequence[ShardInfo], seed: int, epoch: int, world_size: int,
    exclude: frozenset[str] = frozenset(),
) -> list[list[ShardInfo]]:
    """Each process's shards in ``epoch`` (by rank), leaving out the names in ``exclude``
    (shards a resumed epoch has already read)."""
    todo = [s for s in epoch_order(shards, seed, epoch) if s.name not in exclude]
    return balance(todo, world_size)


def worker_shards(
    shards: Sequence[ShardInfo], seed: int, epoch: int, rank: int, world_size: int,
    worker: int, num_workers: int, exclude: frozenset[str] = frozenset(),
) -> list[ShardInfo]:
    """The shards loader worker ``worker`` of process ``rank`` reads in ``epoch``."""
    mine = process_shards(shards, seed, epoch, world_size, exclude)[rank]
    return balance(mine, max(num_workers, 1))[worker]
