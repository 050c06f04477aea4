"""Selective scan that ``torch.export`` (and so the ONNX exporter) handles for any length.

The recurrence of :mod:`modules.mamba.selective_scan_interface` is split into chunks of
``CHUNK`` frames. Only the carry from one chunk to the next runs through torch's ``scan``
higher-order operator (an ONNX ``Scan`` of ceil(L / CHUNK) + 1 iterations); inside the chunks the
recurrence is unrolled, ``CHUNK`` vectorised steps over every chunk at once, so the exported
graph holds few, large operations instead of one loop iteration per frame.

Dynamic length without guards: the chunked view is a gather of the frames
``chunk * CHUNK + step`` (clamped to the last frame), not a pad-and-reshape, whose divisibility
``torch.export`` cannot prove. Frames past the end get ``delta = 0``, so decay 1 and drive 0:
the identity step, leaving the state as it is. The output is gathered back at frames 0..L-1.
The bidirectional block's padding handling lies outside the scan (:mod:`modules.mamba.bimamba`).

Stability: as in :mod:`modules.mamba.selective_scan_chunked`, only the decays
``exp(delta_t A)`` are multiplied together (a chunk's decay is their product), never the
exponential of a difference of cumulative sums, so nothing overflows for any ``delta A``.
"""

from __future__ import annotations

import torch
from torch._higher_order_ops.scan import scan

from modules.mamba.selective_scan_ref import finish_output, prepare_inputs, time_major_factors

__all__ = ["CHUNK", "selective_scan_export"]

Tensor = torch.Tensor

# Frames per chunk: the graph unrolls 2 CHUNK steps per scan call and loops L / CHUNK times
# (bench/bench_onnx_scan.py times model.onnx for other values).
CHUNK = 16


def _chunk_frames(length: int, chunk: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Frame index (chunk * n_chunks,) in step-major order, (step, chunk) flattened, clamped to
    the last frame, and whether each is a real frame (same shape).

    n_chunks is ceil(L / chunk) + 1, never 1: ``torch.export`` would specialise the graph to the
    single chunk of a short example. The extra chunk is all padding, identity steps.
    """
    n_chunks = (length + 2 * chunk - 1) // chunk
    steps = torch.arange(chunk, device=device).unsqueeze(1)
    frames = (steps + torch.arange(n_chunks, device=device) * chunk).reshape(-1)
    return frames.clamp(max=length - 1), frames < length


def _carry(h: Tensor, xs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """One chunk: state h before it, (decay over the chunk, state from zero at its end) ->
    state after it, and h (the chunk's initial state)."""
    decay, end = xs
    return decay * h + end, h.clone()


def selective_scan_export(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """(b, d, L) -> y (b, d, L) [, last_state (b, d, N)]: chunks unrolled, carried by ``scan``.

    Arguments and results as mamba-ssm's ``selective_scan_fn``; computes in float32 (float64
    for float64 inputs). Holds the per-frame decay, drive and state, (L, b, d, N) each
    (rounded up to whole chunks).
    """
    dtype_in = u.dtype
    u_c, delta_c, A_c, B_c, C_c = prepare_inputs(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    groups, nstate = B_c.shape[1], A.shape[1]
    frames, real = _chunk_frames(length, CHUNK, u.device)
    delta_g = torch.where(real, delta_c.index_select(-1, frames), 0.0)
    decay, drive, c = (
        t.unflatten(0, (CHUNK, -1))  # (CHUNK, n_chunks, b, g, d/g, N or 1)
        for t in time_major_factors(u_c.index_select(-1, frames), delta_g, A_c,
                                    B_c.index_select(-1, frames), C_c.index_select(-1, frames))
    )
    decays, drives = decay.unbind(0), drive.unbind(0)  # one node each, not one per step
    # Each chunk's state at its end from a zero start, and its decay: the carry's inputs.
    end = drives[0]
    for step in range(1, CHUNK):
        end = torch.addcmul(drives[step], decays[step], end)
    h0 = u_c.new_zeros(batch, groups, dim // groups, nstate)
    last, starts = scan(_carry, h0, (decay.prod(0), end), dim=0)
    # The chunks again from their initial states, then every step's output at once.
    h, states = starts, []
    for step in range(CHUNK):
        h = torch.addcmul(drives[step], decays[step], h)
        states.append(h)
    ys = (torch.stack(states) * c).sum(-1)  # (CHUNK, n_chunks, b, g, d/g)
    frame = torch.arange(length, device=u.device)
    y = ys[frame % CHUNK, frame // CHUNK]  # (L, b, g, d/g)
    out = finish_output(y.reshape(length, batch, dim).permute(1, 2, 0), u_c, D, z, dtype_in)
    return (out, last.reshape(batch, dim, nstate)) if return_last_state else out
