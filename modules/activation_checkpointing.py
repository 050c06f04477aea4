"""Activation checkpointing of encoder and decoder layers (the ``activation_checkpointing`` key).

:func:`enable_activation_checkpointing` makes every encoder and decoder layer of a model
(:data:`LAYER_TYPES`: the ConMamba encoder and Mamba decoder layers of :mod:`modules.Conmamba`,
SpeechBrain's Conformer, Branchformer and Transformer encoder layers and its Transformer
decoder layer) keep only its inputs in the forward pass and recompute its activations in the
backward pass, with :func:`torch.utils.checkpoint.checkpoint` (non-reentrant, RNG state
preserved, so dropout draws the same masks again; autocast state is restored as well). Layer
activations then cost one layer's worth plus a (B, L, D) input per layer, for about one more
forward pass of compute.

The module tree is left as it is: each layer's ``forward`` is replaced on the instance by a
:class:`CheckpointedForward` that calls the class's ``forward`` through ``checkpoint`` while the
layer trains with gradients enabled, and plainly otherwise (validation, test, inference under
``no_grad``). Parameter and buffer names, ``state_dict`` keys and checkpoints are those of the
plain model, so checkpoints load either way. torch's ``checkpoint_wrapper`` was not used: it
nests each layer in a ``_checkpoint_wrapped_module``, which changes ``named_parameters()``
(and so the names that ``freeze`` patterns and optimizer state go by) even though its hooks
restore the ``state_dict`` keys.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from speechbrain.lobes.models.transformer.Branchformer import BranchformerEncoderLayer
from speechbrain.lobes.models.transformer.Conformer import ConformerEncoderLayer
from speechbrain.lobes.models.transformer.Transformer import (
    TransformerDecoderLayer,
    TransformerEncoderLayer,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

from modules.Conmamba import ConmambaEncoderLayer, MambaDecoderLayer

__all__ = [
    "LAYER_TYPES",
    "CheckpointedForward",
    "checkpointed_layers",
    "disable_activation_checkpointing",
    "enable_activation_checkpointing",
    "layer_stacks",
]

logger = logging.getLogger(__name__)

# The layers that recompute: one encoder or decoder block each, as the encoders and decoders
# that modules.TransformerASR builds call them in their layer loops.
LAYER_TYPES: tuple[type[nn.Module], ...] = (
    ConmambaEncoderLayer,
    MambaDecoderLayer,
    ConformerEncoderLayer,
    BranchformerEncoderLayer,
    TransformerEncoderLayer,
    TransformerDecoderLayer,
)


class CheckpointedForward:
    """A layer's ``forward`` that recomputes in the backward pass while it trains with grad.

    Calls the layer's class ``forward`` through
    ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` when ``layer.training`` and
    gradients are enabled, directly otherwise: same arguments and outputs as the layer's.
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = type(self.layer).forward
        if torch.is_grad_enabled() and self.layer.training:
            return checkpoint(forward, self.layer, *args, use_reentrant=False,
                              preserve_rng_state=True, **kwargs)
        return forward(self.layer, *args, **kwargs)


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` whose ``forward`` is a :class:`CheckpointedForward`."""
    return [m for m in model.modules() if _is_checkpointed(m)]


def _is_checkpointed(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), CheckpointedForward)


def layer_stacks(model: nn.Module) -> list[list[nn.Module]]:
    """The encoder and decoder layer stacks of ``model``: the :data:`LAYER_TYPES` layers of
    each module list that holds some, in order."""
    stacks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            layers = [m for m in module if isinstance(m, LAYER_TYPES)]
            if layers:
                stacks.append(layers)
    return stacks


def enable_activation_checkpointing(model: nn.Module, layers: int | None = None) -> int:
    """The encoder/decoder layers of ``model`` (:data:`LAYER_TYPES`) recompute their
    activations in the backward pass while training: every layer, or with ``layers`` the
    first ``layers`` of each stack (:func:`layer_stacks`; Megatron-LM's "block" recompute:
    memory and extra time in proportion). Returns how many layers recompute (layers already
    set count once)."""
    if layers is not None and layers < 0:
        raise ValueError(f"layers must be >= 0 or None (all); got {layers}")
    chosen = [m for stack in layer_stacks(model) for m in stack[:layers]]
    for layer in chosen:
        if not _is_checkpointed(layer):
            layer.forward = CheckpointedForward(layer)
    return len(chosen)


def disable_activation_checkpointing(model: nn.Module) -> int:
    """Undoes :func:`enable_activation_checkpointing`; returns how many layers it restored."""
    layers = checkpointed_layers(model)
    for layer in layers:
        del layer.forward
    return len(layers)
