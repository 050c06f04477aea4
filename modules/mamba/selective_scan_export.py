"""Selective scan that ``torch.export`` (and so the ONNX exporter) handles for any length.

The recurrence of :mod:`modules.mamba.selective_scan_interface` runs through torch's ``scan``
higher-order operator, one step per time frame: the exported graph holds one loop whose trip
count is the input's length, so batch and length stay dynamic. A Python loop over a dynamic
number of frames or chunks cannot be exported (its trip count would have to be a constant).
Eager calls run the same operator step by step: slow, meant for export and its tests.
"""

from __future__ import annotations

import torch
from torch._higher_order_ops.scan import scan

from modules.mamba.selective_scan_ref import finish_output, prepare_inputs, time_major_factors

__all__ = ["selective_scan_export"]

Tensor = torch.Tensor


def _step(h: Tensor, xs: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """One frame: state h (b, g, d/g, N) and (decay, drive, C) of the frame -> new h, y_t."""
    decay, drive, c = xs
    h = decay * h + drive
    return h, (h * c).sum(-1)


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
    """(b, d, L) -> y (b, d, L) [, last_state (b, d, N)] through torch's ``scan`` operator.

    Arguments and results as mamba-ssm's ``selective_scan_fn``; computes in float32 (float64
    for float64 inputs). Holds the per-frame decay and drive, (L, b, d, N) each.
    """
    dtype_in = u.dtype
    u_c, delta_c, A_c, B_c, C_c = prepare_inputs(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    groups, nstate = B_c.shape[1], A.shape[1]
    decay, drive, c = time_major_factors(u_c, delta_c, A_c, B_c, C_c)
    h0 = u_c.new_zeros(batch, groups, dim // groups, nstate)
    h, ys = scan(_step, h0, (decay, drive, c), dim=0)  # ys (L, b, g, d/g)
    y = ys.reshape(length, batch, dim).permute(1, 2, 0)
    out = finish_output(y, u_c, D, z, dtype_in)
    return (out, h.reshape(batch, dim, nstate)) if return_last_state else out
