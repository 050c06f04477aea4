"""Reference selective scan and causal convolution, and the argument handling of every scan.

:func:`selective_scan_ref` runs the recurrence of :mod:`modules.mamba.selective_scan_interface`
as a plain loop over time steps, and :func:`causal_conv1d_ref` the causal depthwise
convolution as a loop over output steps: slow and obviously right, they are the oracles the
tests hold the fast paths to. :func:`prepare_inputs` and :func:`finish_output` are the part
every scan path shares (argument checks, compute dtype, delta bias and softplus before the
recurrence; skip term, gate and dtype after it), so the paths differ only in the recurrence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "causal_conv1d_ref",
    "check_conv_args",
    "finish_output",
    "prepare_inputs",
    "selective_scan_ref",
    "time_major_factors",
]

Tensor = torch.Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float64 for float64 inputs (float32 on MPS, which has no float64), else float32."""
    return torch.float64 if t.dtype == torch.float64 and t.device.type != "mps" else torch.float32


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> int:
    """Validate the mamba-ssm shapes; return the number of B/C groups."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must be (batch, dim, L); got {tuple(u.shape)}, "
                         f"{tuple(delta.shape)}")
    batch, dim, length = u.shape
    if A.is_complex() or A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be real (dim, N) = ({dim}, N); got {tuple(A.shape)} {A.dtype}")
    groups = None
    for name, t in (("B", B), ("C", C)):
        shape = (batch, A.shape[1], length)
        if t.dim() == 3 and tuple(t.shape) == shape:
            g = 1
        elif t.dim() == 4 and (t.shape[0], t.shape[2], t.shape[3]) == shape:
            g = t.shape[1]
        else:
            raise ValueError(f"{name} must be (batch, N, L) or (batch, groups, N, L) with "
                             f"batch={batch}, N={A.shape[1]}, L={length}; got {tuple(t.shape)}")
        if g < 1 or dim % g:
            raise ValueError(f"{name} has {g} groups, which do not divide dim={dim}")
        if groups is not None and g != groups:
            raise ValueError(f"B and C must have the same number of groups; got {groups}, {g}")
        groups = g
    return groups


def prepare_inputs(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    delta_bias: Tensor | None,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Cast to the compute dtype, apply bias and softplus to delta, make B and C 4-D.

    Arguments as mamba-ssm's ``selective_scan_fn``, shapes checked; returns u, delta (b, d, L),
    A (d, N), B, C (b, g, N, L), all float32 (float64 for float64 inputs, except on MPS).
    """
    _check_shapes(u, delta, A, B, C)
    dtype = _compute_dtype(u)
    u = u.to(dtype)
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype).unsqueeze(-1)
    if delta_softplus:
        delta = F.softplus(delta)
    B = (B.unsqueeze(1) if B.dim() == 3 else B).to(dtype)
    C = (C.unsqueeze(1) if C.dim() == 3 else C).to(dtype)
    return u, delta, A.to(dtype), B, C


def finish_output(
    y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, dtype_in: torch.dtype
) -> Tensor:
    """Add the skip term ``D * u``, gate with ``silu(z)``, cast back to the input dtype."""
    if D is not None:
        y = y + u * D.to(y.dtype).unsqueeze(-1)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype_in)


def time_major_factors(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-step factors of the recurrence from :func:`prepare_inputs`' tensors, time first.

    Returns decay ``exp(delta_t * A)`` and drive ``delta_t * B_t * u_t``, (L, b, g, d/g, N),
    and C (L, b, g, 1, N), so that ``h_t = decay_t * h + drive_t``, ``y_t = <h_t, C_t>``.
    """
    batch, dim, length = u.shape
    groups, nstate = B.shape[1], A.shape[1]
    heads = dim // groups
    delta5 = delta.permute(2, 0, 1).reshape(length, batch, groups, heads, 1)
    u5 = u.permute(2, 0, 1).reshape(length, batch, groups, heads, 1)
    decay = torch.exp(delta5 * A.view(groups, heads, nstate))
    drive = delta5 * u5 * B.permute(3, 0, 1, 2).unsqueeze(3)
    return decay, drive, C.permute(3, 0, 1, 2).unsqueeze(3)


def selective_scan_ref(
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
    """(b, d, L) -> y (b, d, L) [, last_state (b, d, N)]: a plain loop over time steps.

    The oracle of the tests. Computes in float32 (float64 for float64 inputs), keeps
    every state for autograd, and is slow; arguments as mamba-ssm's ``selective_scan_fn``.
    """
    dtype_in = u.dtype
    u_c, delta_c, A_c, B_c, C_c = prepare_inputs(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, dim, _ = u.shape
    groups, nstate = B_c.shape[1], A.shape[1]
    decay, drive, c = time_major_factors(u_c, delta_c, A_c, B_c, C_c)
    c_steps = c.unbind(0)
    h = u_c.new_zeros(batch, groups, dim // groups, nstate)
    ys = []
    for decay_t, drive_t, c_t in zip(decay.unbind(0), drive.unbind(0), c_steps, strict=True):
        h = decay_t * h + drive_t
        ys.append((h * c_t).sum(-1).reshape(batch, dim))
    y = torch.stack(ys, dim=-1) if ys else u_c.new_zeros(batch, dim, 0)
    out = finish_output(y, u_c, D, z, dtype_in)
    return (out, h.reshape(batch, dim, nstate)) if return_last_state else out


def check_conv_args(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None
) -> None:
    """Validate ``causal_conv1d_fn``'s arguments: x (b, d, L), weight (d, K), bias (d,)."""
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"x must be (batch, dim, L) and weight (dim, K); got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (x.shape[1],):
        raise ValueError(f"bias must be (dim,) = ({x.shape[1]},); got {tuple(bias.shape)}")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish'; got {activation!r}")


def causal_conv1d_ref(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """(b, d, L), (d, K), (d,) -> (b, d, L): causal depthwise conv as a loop over time steps."""
    check_conv_args(x, weight, bias, activation)
    k = weight.shape[1]
    padded = F.pad(x, (k - 1, 0))
    outs = [(padded[:, :, t : t + k] * weight).sum(-1) for t in range(x.shape[-1])]
    out = torch.stack(outs, dim=-1) if outs else torch.zeros_like(x)
    if bias is not None:
        out = out + bias.unsqueeze(-1)
    return F.silu(out) if activation is not None else out
