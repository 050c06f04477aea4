"""A process of a 2-process gloo group reading one epoch of shards through ShardLoader (run by
tests/test_shards.py with torch.multiprocessing.spawn): it writes the IDs of each batch it
got and its epoch stats to ``<out>/rank<N>.json``."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def read_epoch(rank: int, world: int, index_path: str, store: str, out: str) -> None:
    """One epoch (epoch 1, no loader workers, batches of 3 utterances) on process ``rank``."""
    from speechbrain.dataio.batch import PaddedBatch

    from mamba_asr.shards.dataset import ShardDataset, ShardLoader
    from mamba_asr.shards.fetch import read_index
    from mamba_asr.shards.training import ShardProgress

    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=world)
    try:
        index = read_index(index_path)
        data = ShardDataset(index, Path(out) / "cache", 0, seed=7, batch_size=3)
        data.set_output_keys(["id"])
        loader = ShardLoader(data, 0, PaddedBatch, ShardProgress(index))
        loader.set_epoch(1)
        batches = [list(batch.id) for batch in loader]
        plan = loader.dataset.plan
        mine = [s.name for s in data.my_shards(0)]
        result = {"batches": batches, "shards": mine, "stats": loader.epoch_stats(),
                  "plan_rank": plan.rank}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def spawned(rank: int, world: int, index_path: str, store: str, out: str) -> None:
    """``torch.multiprocessing.spawn``'s entry point."""
    read_epoch(rank, world, index_path, store, out)
