"""Tiny encoder-decoder models, one training step with and without activation checkpointing,
and the DDP worker of tests/test_activation_checkpointing.py.

Module-level functions importing only torch and the model code, so a DDP process (fork or
spawn) and a subprocess (the Triton interpreter's) start them cheaply.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from modules.activation_checkpointing import enable_activation_checkpointing
from modules.TransformerASR import TransformerASR

VOCAB = 11
FEATURES = 20
MAMBA = {"d_state": 4, "expand": 2, "d_conv": 4, "bidirectional": True}
# (encoder_module, decoder_module or None, attention_type): the ConMamba encoder with the
# Mamba decoder, SpeechBrain's Conformer (as the configs: RelPosMHAXL) and Transformer encoders
# with its Transformer decoder, a ConMamba encoder alone.
PAIRS = {
    "conmamba-mamba": ("conmamba", "mamba", "RelPosMHAXL"),
    "conformer-transformer": ("conformer", "transformer", "RelPosMHAXL"),
    "transformer-transformer": ("transformer", "transformer", "regularMHA"),
    "conmamba": ("conmamba", None, "RelPosMHAXL"),
}


def tiny_model(pair: str, dropout: float = 0.1, seed: int = 0, layers: int = 2,
               d_model: int = 16, bidirectional: bool = True) -> TransformerASR:
    """A model of ``PAIRS[pair]`` with ``layers`` encoder and decoder layers, in training
    mode."""
    encoder, decoder, attention = PAIRS[pair]
    torch.manual_seed(seed)
    return TransformerASR(
        tgt_vocab=VOCAB, input_size=FEATURES, d_model=d_model, nhead=2,
        num_encoder_layers=layers, num_decoder_layers=layers if decoder else 0,
        d_ffn=2 * d_model, dropout=dropout, encoder_module=encoder,
        decoder_module=decoder or "transformer", attention_type=attention,
        normalize_before=True, causal=False,
        positional_encoding="fixed_abs_sine" if attention == "regularMHA" else None,
        mamba_config={**MAMBA, "bidirectional": bidirectional},
    ).train()


def tiny_batch(batch: int = 4, frames: int = 24, tokens: int = 7, seed: int = 1
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Features (B, frames, FEATURES), relative lengths (B,) with padded items, target
    tokens (B, tokens) padded with 0 at the end."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(batch, frames, FEATURES, generator=gen)
    wav_len = torch.tensor([1.0, 0.75, 0.5, 0.875, 1.0, 0.625, 0.5, 1.0][:batch])
    tgt = torch.randint(1, VOCAB, (batch, tokens), generator=gen)
    for i in range(batch):
        tgt[i, tokens - i % 3:] = 0
    return src, wav_len, tgt


def loss_of(model: nn.Module, src: Tensor, wav_len: Tensor, tgt: Tensor | None) -> Tensor:
    """A fixed linear function of the encoder and (with ``tgt``) decoder outputs, averaged
    over the items (so the mean of two halves' losses is the whole batch's)."""
    enc, dec = model(src, tgt, wav_len, pad_idx=0)
    gen = torch.Generator().manual_seed(2)
    loss = (enc * torch.randn(enc.shape[1:], generator=gen).to(enc.device)).sum()
    if dec is not None:
        loss = loss + (dec * torch.randn(dec.shape[1:], generator=gen).to(dec.device)).sum()
    return loss / src.shape[0]


def gradients(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter's gradient by name (zeros where none)."""
    return {name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
            for name, p in model.named_parameters()}


def ddp_worker(rank: int, world: int, folder: str) -> None:
    """One DDP process (gloo): the tiny ConMamba/Mamba model, checkpointed, without dropout,
    trains one step on its share of :func:`tiny_batch`; its gradients go to
    ``folder/grads<rank>.pt``."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{Path(folder) / 'rendezvous'}", rank=rank,
        world_size=world,
    )
    try:
        model = tiny_model("conmamba-mamba", dropout=0.0)
        layers = enable_activation_checkpointing(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        src, wav_len, tgt = (t.chunk(world)[rank] for t in tiny_batch())
        loss_of(ddp, src, wav_len, tgt).backward()
        torch.save({"layers": layers, "grads": gradients(model)},
                   Path(folder) / f"grads{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def max_rel_err(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert got.keys() == expected.keys()
    return max(rel_err(got[k], expected[k]) for k in expected)


def step(model: torch.nn.Module, seed: int = 3, device: str = "cpu",
         autocast: torch.dtype | None = None, decoder: bool = True, batch: int = 4,
         frames: int = 24) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of one forward/backward on :func:`tiny_batch` (without targets
    for an encoder alone), dropout seeded."""
    model.zero_grad(set_to_none=True)
    src, wav_len, tgt = (t.to(device) for t in tiny_batch(batch, frames))
    tgt = tgt if decoder else None
    torch.manual_seed(seed)
    with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
        loss = loss_of(model, src, wav_len, tgt)
    loss.backward()
    return loss.item(), gradients(model)


def with_and_without(pair: str, device: str = "cpu", autocast: torch.dtype | None = None,
                     batch: int = 4, frames: int = 24, **model_args) -> tuple[tuple, tuple, int]:
    """(loss, grads) without and with checkpointing of the same model, same seed, and how
    many layers recomputed."""
    model = tiny_model(pair, **model_args).to(device)
    args = {"device": device, "autocast": autocast, "decoder": PAIRS[pair][1] is not None,
            "batch": batch, "frames": frames}
    plain = step(model, **args)
    layers = enable_activation_checkpointing(model)
    return plain, step(model, **args), layers
