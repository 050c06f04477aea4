"""Collectives over the DDP processes that also work in a single process."""

from __future__ import annotations

from typing import Any

import torch
from speechbrain.utils.distributed import is_distributed_initialized


def gather(value: Any) -> list[Any]:
    """``value`` of every DDP process, in rank order (every process calls this at the same
    point); ``[value]`` outside DDP."""
    if not is_distributed_initialized():
        return [value]
    values: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values
