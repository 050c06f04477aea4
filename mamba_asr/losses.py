"""Losses of the recipes: SpeechBrain's, computed where the device has the kernels.

torch has a CTC loss kernel for the CPU and CUDA only (``aten::_ctc_loss``); on Apple MPS
the recipes would stop at the first batch. :func:`ctc_loss` computes it on the CPU for
tensors on such a device and returns it on theirs; autograd carries the gradient back.
"""

from __future__ import annotations

import torch
from speechbrain.nnet.losses import ctc_loss as _speechbrain_ctc_loss

__all__ = ["ctc_device", "ctc_loss"]

# Device types whose torch build has no CTC loss kernel.
_NO_CTC_KERNEL = ("mps",)


def ctc_device(device: torch.device) -> torch.device:
    """Where the CTC loss of tensors on ``device`` is computed: the CPU for Apple MPS."""
    return torch.device("cpu") if device.type in _NO_CTC_KERNEL else device


def ctc_loss(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lens: torch.Tensor,
    target_lens: torch.Tensor,
    blank_index: int,
    reduction: str = "mean",
) -> torch.Tensor:
    """SpeechBrain's ``ctc_loss`` on :func:`ctc_device`, returned on ``log_probs``' device.

    log_probs (batch, time, classes); targets (batch, tokens); input_lens and target_lens
    relative lengths (batch,); ``reduction`` as SpeechBrain's ("mean", "batchmean", "sum",
    "none").
    """
    device = ctc_device(log_probs.device)
    if device == log_probs.device:
        return _speechbrain_ctc_loss(log_probs, targets, input_lens, target_lens, blank_index,
                                     reduction)
    moved = [t.to(device) for t in (log_probs, targets, input_lens, target_lens)]
    return _speechbrain_ctc_loss(*moved, blank_index, reduction).to(log_probs.device)
