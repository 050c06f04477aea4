"""Selective scan as Triton kernels: the CUDA path when mamba-ssm is not installed (opt-in).

Same core as :func:`selective_scan_chunked.selective_scan_chunked` (no D, z, bias or
softplus: the caller applies those) with the state kept in registers. One program holds a
block of ``BLOCK_D`` channels of one batch element and walks time in chunks of ``BLOCK_T``
steps; inside a chunk the recurrence ``h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t`` is a
``tl.associative_scan`` (parallel over the chunk's steps). The forward pass saves the state
entering each chunk, (b, d, N, L / BLOCK_T); the backward pass walks the chunks last to
first, recomputes each chunk's states from it and runs the adjoint recurrence as a reversed
associative scan. dB and dC sum over the channels of a group and dA over the batch, with
atomic adds. Computes in float32.

Triton compiles these for NVIDIA/AMD GPUs; with ``TRITON_INTERPRET=1`` (set before this
module is imported) they run on CPU tensors, which is how the tests check them on machines
without a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

# Tile sizes and warps of a program, fixed before the first launch (bench/bench_scan.py
# --triton-blocks sweeps them on a GPU): (8, 16, 16) float32 tiles are 16 registers a thread
# each at 4 warps.
BLOCK_T = 16
MAX_BLOCK_D = 8
NUM_WARPS = 4


@triton.jit
def _combine(a1, b1, a2, b2):
    """(a1, b1) then (a2, b2) for h -> a h + b: the pair of the composed map."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _program(A_ptr, dim, nstate, heads, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's batch element, channel/state offsets and masks, its block of A and the
    group of its channels (BLOCK_D divides the channels per group)."""
    b = tl.program_id(0)
    d0 = tl.program_id(1) * BLOCK_D
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d, mask_n = offs_d < dim, offs_n < nstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * nstate + offs_n[None, :], mask=mask_dn, other=0.0)
    return b, d0 // heads, offs_d, offs_n, mask_d, mask_n, mask_dn, A


@triton.jit
def _chunk(
    u_ptr, delta_ptr, A, B_ptr, C_ptr, b, g, offs_d, mask_d, offs_n, mask_n, t0, length,
    stride_ub, stride_ud, stride_bb, stride_bg, stride_bn,
    BLOCK_T: tl.constexpr,
):
    """One chunk: offsets and masks of its (D, T) and (N, T) elements; delta, u (D, T); the
    group's B, C (N, T); decays a and inputs x (D, N, T)."""
    offs_t = t0 + tl.arange(0, BLOCK_T)
    mask_t = offs_t < length
    m2 = mask_d[:, None] & mask_t[None, :]
    du_off = b * stride_ub + offs_d[:, None] * stride_ud + offs_t[None, :]
    dl = tl.load(delta_ptr + du_off, mask=m2, other=0.0).to(tl.float32)
    uu = tl.load(u_ptr + du_off, mask=m2, other=0.0).to(tl.float32)
    bc_off = b * stride_bb + g * stride_bg + offs_n[:, None] * stride_bn + offs_t[None, :]
    m_nt = mask_n[:, None] & mask_t[None, :]
    Bt = tl.load(B_ptr + bc_off, mask=m_nt, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + bc_off, mask=m_nt, other=0.0).to(tl.float32)
    a = tl.exp(dl[:, None, :] * A[:, :, None])
    x = (dl * uu)[:, None, :] * Bt[None, :, :]
    return offs_t, du_off, m2, bc_off, m_nt, dl, uu, Bt, Ct, a, x


@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, y_ptr, last_ptr, saved_ptr,
    dim, nstate, length, heads,
    stride_ub, stride_ud, stride_bb, stride_bg, stride_bn,
    SAVE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b, g, offs_d, offs_n, mask_d, mask_n, mask_dn, A = _program(
        A_ptr, dim, nstate, heads, BLOCK_D, BLOCK_N)
    lane = tl.arange(0, BLOCK_T)
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    n_chunks = (length + BLOCK_T - 1) // BLOCK_T
    state_off = (b * dim + offs_d[:, None]) * nstate + offs_n[None, :]
    c = 0
    while c < n_chunks:  # (a while loop: Triton's interpreter cannot range over a runtime value)
        if SAVE:
            tl.store(saved_ptr + state_off * n_chunks + c, h, mask=mask_dn)
        _, du_off, m2, _, _, _, _, _, Ct, a, x = _chunk(
            u_ptr, delta_ptr, A, B_ptr, C_ptr, b, g, offs_d, mask_d, offs_n, mask_n,
            c * BLOCK_T, length, stride_ub, stride_ud, stride_bb, stride_bg, stride_bn, BLOCK_T,
        )
        a_s, x_s = tl.associative_scan((a, x), 2, _combine)
        hs = x_s + a_s * h[:, :, None]
        tl.store(y_ptr + du_off, tl.sum(hs * Ct[None, :, :], axis=1), mask=m2)
        h = tl.sum(tl.where((lane == BLOCK_T - 1)[None, None, :], hs, 0.0), axis=2)
        c += 1
    tl.store(last_ptr + state_off, h, mask=mask_dn)


@triton.jit
def _bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, gy_ptr, glast_ptr, saved_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr,
    dim, nstate, length, heads,
    stride_ub, stride_ud, stride_bb, stride_bg, stride_bn,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b, g, offs_d, offs_n, mask_d, mask_n, mask_dn, A = _program(
        A_ptr, dim, nstate, heads, BLOCK_D, BLOCK_N)
    lane = tl.arange(0, BLOCK_T)
    n_chunks = (length + BLOCK_T - 1) // BLOCK_T
    state_off = (b * dim + offs_d[:, None]) * nstate + offs_n[None, :]
    carry = tl.load(glast_ptr + state_off, mask=mask_dn, other=0.0)  # dL/dh after the chunk
    d_A = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    c = n_chunks - 1
    while c >= 0:
        t0 = c * BLOCK_T
        offs_t, du_off, m2, bc_off, m_nt, dl, uu, Bt, Ct, a, x = _chunk(
            u_ptr, delta_ptr, A, B_ptr, C_ptr, b, g, offs_d, mask_d, offs_n, mask_n,
            t0, length, stride_ub, stride_ud, stride_bb, stride_bg, stride_bn, BLOCK_T,
        )
        h0 = tl.load(saved_ptr + state_off * n_chunks + c, mask=mask_dn, other=0.0)
        a_s, x_s = tl.associative_scan((a, x), 2, _combine)
        hs = x_s + a_s * h0[:, :, None]  # h_t
        gy = tl.load(gy_ptr + du_off, mask=m2, other=0.0).to(tl.float32)
        # Adjoint states lam_t = C_t gy_t + a_{t+1} lam_{t+1}; the decay of the next step
        # (1 past the end: padding), and the carry entering at the chunk's last lane.
        m_nxt = mask_d[:, None] & (offs_t + 1 < length)[None, :]
        dl_nxt = tl.load(delta_ptr + du_off + 1, mask=m_nxt, other=0.0).to(tl.float32)
        last_lane = (lane == BLOCK_T - 1)[None, None, :]
        alpha = tl.where(last_lane, 0.0, tl.exp(dl_nxt[:, None, :] * A[:, :, None]))
        beta = Ct[None, :, :] * gy[:, None, :] + tl.where(last_lane, carry[:, :, None], 0.0)
        _, lam = tl.associative_scan((alpha, beta), 2, _combine, reverse=True)
        carry = tl.sum(tl.where((lane == 0)[None, None, :], a * lam, 0.0), axis=2)
        # y_t = <C_t, h_t>: dC sums h gy over a group's channels; x_t = delta_t u_t B_t gives
        # dB (lam delta u) and r = <B_t, lam_t> for du and ddelta. Padded channels add zeros.
        tl.atomic_add(dC_ptr + bc_off, tl.sum(hs * gy[:, None, :], axis=0), mask=m_nt,
                      sem="relaxed")
        tl.atomic_add(dB_ptr + bc_off, tl.sum(lam * (dl * uu)[:, None, :], axis=0), mask=m_nt,
                      sem="relaxed")
        r = tl.sum(Bt[None, :, :] * lam, axis=1)
        # w = lam_t a_t h_{t-1} = lam_t (h_t - x_t) = dL/d(delta_t A).
        w = lam * (hs - x)
        tl.store(du_ptr + du_off, r * dl, mask=m2)
        tl.store(ddelta_ptr + du_off, r * uu + tl.sum(w * A[:, :, None], axis=1), mask=m2)
        d_A += tl.sum(w * dl[:, None, :], axis=2)
        c -= 1
    tl.atomic_add(dA_ptr + offs_d[:, None] * nstate + offs_n[None, :], d_A, mask=mask_dn,
                  sem="relaxed")


_MAX_OFFSET = 2**31 - 1  # the kernels index with 32-bit offsets


def _launch_args(u: Tensor, B: Tensor, A: Tensor) -> tuple[tuple, dict[str, int], tuple]:
    """Grid, block sizes and the shared size/stride arguments."""
    batch, dim, length = u.shape
    groups, nstate = B.shape[1], A.shape[1]
    n_saved = batch * dim * nstate * triton.cdiv(length, BLOCK_T)
    if max(u.numel(), B.numel(), n_saved) > _MAX_OFFSET:
        raise ValueError(
            f"the Triton scan indexes with 32-bit offsets: u (batch, dim, L) = "
            f"{tuple(u.shape)} has {u.numel():,} elements, B {B.numel():,} and the saved "
            f"chunk states {n_saved:,}, over the limit of {_MAX_OFFSET:,}. Split the batch "
            f"or use impl 'torch'."
        )
    heads = dim // groups
    block_d = 1
    while block_d < MAX_BLOCK_D and heads % (2 * block_d) == 0:
        block_d *= 2  # a block of channels never spans two groups
    blocks = {"BLOCK_D": block_d, "BLOCK_N": triton.next_power_of_2(nstate),
              "BLOCK_T": BLOCK_T}
    grid = (batch, triton.cdiv(dim, block_d))
    sizes = (dim, nstate, length, heads, u.stride(0), u.stride(1), B.stride(0), B.stride(1),
             B.stride(2))
    return grid, blocks, sizes


class SelectiveScanTriton(torch.autograd.Function):
    """u, delta (b, d, L), A (d, N), B, C (b, g, N, L), all float32 and contiguous ->
    y (b, d, L), last state (b, d, N). ``grad_enabled`` is the grad mode outside ``apply``
    (``needs_input_grad`` ignores it): without it no chunk states are saved."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                grad_enabled: bool) -> tuple[Tensor, Tensor]:
        batch, dim, length = u.shape
        grid, blocks, sizes = _launch_args(u, B, A)
        y = torch.empty_like(u)
        last = u.new_empty(batch, dim, A.shape[1])
        keep = grad_enabled and any(ctx.needs_input_grad[:5])
        n_chunks = triton.cdiv(length, BLOCK_T)
        saved = u.new_empty(batch, dim, A.shape[1], n_chunks if keep else 1)
        _fwd_kernel[grid](u, delta, A, B, C, y, last, saved, *sizes, SAVE=keep,
                          num_warps=NUM_WARPS, **blocks)
        if keep:
            ctx.save_for_backward(u, delta, A, B, C, saved)
        ctx.set_materialize_grads(False)
        return y, last

    @staticmethod
    def backward(ctx: Any, g_y: Tensor | None, g_last: Tensor | None) -> tuple:
        u, delta, A, B, C, saved = ctx.saved_tensors
        grid, blocks, sizes = _launch_args(u, B, A)
        g_y = torch.zeros_like(u) if g_y is None else g_y.float().contiguous()
        g_last = (u.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if g_last is None
                  else g_last.float().contiguous())
        d_u, d_delta = torch.empty_like(u), torch.empty_like(delta)
        d_A, d_B, d_C = torch.zeros_like(A), torch.zeros_like(B), torch.zeros_like(C)
        _bwd_kernel[grid](u, delta, A, B, C, g_y, g_last, saved, d_u, d_delta, d_A, d_B, d_C,
                          *sizes, num_warps=NUM_WARPS, **blocks)
        return d_u, d_delta, d_A, d_B, d_C, None


def selective_scan_core(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor
                        ) -> tuple[Tensor, Tensor]:
    """(b, d, L) x2, (d, N), (b, g, N, L) x2, float32 -> y (b, d, L), last state (b, d, N)."""
    args = [t.float().contiguous() for t in (u, delta, A, B, C)]
    return SelectiveScanTriton.apply(*args, torch.is_grad_enabled())
