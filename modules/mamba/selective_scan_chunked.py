"""The pure-PyTorch selective scan: a chunked parallel scan with a recomputing backward pass.

:func:`selective_scan_chunked` runs on CPU, Apple MPS and CUDA; it is the ``torch`` path of
:mod:`modules.mamba.selective_scan_interface` and has the same arguments and results.

The chunked scan splits time into chunks of ``T`` steps (a power of two picked per device,
:func:`_chunk_size`) and keeps a chunk batch-time-major as (batch, T, groups, N, dim/groups),
so each time step of a batch element is one long contiguous row. Inside a chunk the linear
recurrence is solved by a parallel scan over the pairs (decay, input): Blelloch's
work-efficient scheme (:func:`_scan_plan`), ``2 log2`` of the block length vectorised steps,
over the whole chunk on GPUs and over blocks of 4 steps chained by one step each on CPU (less
arithmetic), never a loop over single time steps; the state is carried from one chunk to the
next by a short loop over chunks. On CPU the batch is also split into tiles so that a chunk's
buffers stay in cache (:func:`_batch_tile`), and the layout changes between (batch, dim, L)
and the chunks are made a block of chunks at a time. Stability: the scan works on the decays
``exp(delta_t A)`` themselves, computed from ``delta_t A`` (<= 0 for the usual
``delta >= 0``, ``A < 0``) once per step in the forward pass and once more in the backward
pass, and only multiplies them together. Products of numbers in [0, 1] may underflow to
zero where the true value is negligible, but never overflow, and unlike differences of
cumulative sums of log-decays they lose no precision on long or stiff sequences; no
exponential of a positive number is ever taken, however large ``delta`` or ``|A|``. The
backward pass (:class:`_ChunkedSelectiveScan`) keeps from the forward pass only the
chunk-boundary states and a batch-time-major copy of u and delta; it recomputes each chunk's
decays and states and runs the adjoint recurrence as a reversed parallel scan with the same
decays, so its memory is one chunk of states plus L/T boundary states, never all
(batch, dim, L, N) states. Internally it computes in float32 (float64 for float64 inputs,
except on MPS, which has no float64); float16 and bfloat16 inputs are accepted and y is
returned in their dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from modules.mamba.selective_scan_ref import finish_output, prepare_inputs

__all__ = ["selective_scan_chunked"]

# Chunking. On CPU: chunks of _CPU_CHUNK steps, scanned in blocks of _SCAN_BLOCK steps, and
# the batch split into tiles whose chunk buffers, (tile, T, dim, N), take about
# _CPU_TILE_BYTES per thread. 2 MB float32 buffers keep a chunk's working set (6 buffers)
# in cache and were measured about 20 % faster than 4 MB ones with one thread (1 MB: as
# fast; 512 KB: slower, more calls). A plain step-by-step update inside each chunk (blocks of
# 1 or 2) was measured 9 % faster than blocks of 4 (fwd+bwd 0.419 vs 0.463 s, b 8, d 1024,
# N 16, L 1000, 1 thread) but is a loop over time steps, which this scan avoids by design.
# Layouts change _BLOCK_STEPS steps at a time. On GPUs:
# one chunk of the whole batch fills about _GPU_CHUNK_ELEMENTS, scanned as one block (on an
# H100, fwd+bwd at b 8, d 1024, N 16, L 1000: 2^24 elements 15 % faster than 2^23 for 0.3 GB
# more; larger chunks gained little more; 8-row blocks were about 2x slower).
_CPU_CHUNK = 8
_CPU_TILE_BYTES = 1 << 21
_GPU_CHUNK_ELEMENTS = 1 << 24
_MIN_CHUNK, _MAX_CHUNK = 8, 1024
_BLOCK_STEPS = 64
_SCAN_BLOCK = 4
_LOG2E = 1.4426950408889634

Tensor = torch.Tensor


# --------------------------------------------------------------------------- chunk sizes


def _chunk_size(rows: int, length: int, device: torch.device) -> int:
    """Chunk length T: a power of two whose (T, rows) buffer stays cache/launch friendly.

    On CPU a fixed ``_CPU_CHUNK`` steps (the batch is split into tiles instead, see
    :func:`_batch_tile`); on GPUs as many steps as fit ``_GPU_CHUNK_ELEMENTS``.
    """
    if device.type == "cpu":
        t = _CPU_CHUNK
    else:
        t = 1 << max(0, (_GPU_CHUNK_ELEMENTS // max(rows, 1)).bit_length() - 1)
        t = min(max(t, _MIN_CHUNK), _MAX_CHUNK)
    return max(1, min(t, length))


def _batch_tile(batch: int, per_step: int, T: int, like: Tensor) -> int:
    """Batch elements scanned together: on CPU as many as keep a chunk buffer of T steps of
    ``per_step`` (dim x N) elements within ``_CPU_TILE_BYTES`` per thread (each thread works
    on its share of every buffer); elsewhere the whole batch."""
    if like.device.type != "cpu":
        return batch
    budget = _CPU_TILE_BYTES * max(1, torch.get_num_threads())
    return max(1, min(batch, budget // (T * per_step * like.element_size())))


# --------------------------------------------------------------------------- Blelloch plan


def _blelloch(lo: int, n: int) -> list[tuple[bool, int, tuple, tuple, tuple]]:
    """Blelloch's steps for the scan-order rows ``lo .. lo + n - 1`` (see :func:`_scan_plan`),
    rows given as ``(start, step, count)``.

    The up-sweep leaves in row ``i`` the combination of the span of ``lowbit(i + 1)`` rows
    ending at ``i``; the down-sweep completes the remaining rows from the coarsest span down.
    A product of decays over a span that holds the first row is never used, so none is made.
    """
    steps = []
    levels = []
    s = 1
    while 2 * s <= n:
        cnt = n // (2 * s)
        right = (lo + 2 * s - 1, 2 * s, cnt)
        steps.append((False, s, right, right, (lo + s - 1, 2 * s, cnt)))
        if cnt > 1 and (4 * s <= n or 6 * s - 1 < n):  # spans of 2s rows are used later
            pair = (lo + 4 * s - 1, 2 * s, cnt - 1)
            steps.append((True, s, pair, (lo + 3 * s - 1, 2 * s, cnt - 1), pair))
        levels.append(s)
        s *= 2
    for s in reversed(levels):
        if 3 * s - 1 < n:
            cnt = (n - 3 * s) // (2 * s) + 1
            rows = (lo + 3 * s - 1, 2 * s, cnt)
            steps.append((False, s, rows, rows, (lo + 2 * s - 1, 2 * s, cnt)))
    return steps


@functools.cache
def _scan_plan(
    n: int, reverse: bool, block: int
) -> tuple[tuple[bool, int, slice, slice, slice], ...]:
    """The vectorised steps of a scan of n rows, as ``(is_product, level, target, left,
    right)`` with row slices.

    A step ``(False, s, t, f, o)`` is ``b[t] += decay_s[f] * b[o]``; ``(True, s, t, l, r)``
    is ``work[t] = decay_s[l] * decay_s[r]``, where ``decay_1`` is ``a`` and ``decay_s``
    (s > 1) is ``work``, holding in row ``i`` the product of the decays of the s rows ending
    at ``i`` (in scan order). The rows are scanned in blocks of ``block`` rows (0: one block)
    by Blelloch's scheme, each block starting from the last row of the block before.
    """

    def rows(spec: tuple[int, int, int]) -> slice:
        start, step, count = spec
        if reverse:  # mirrored; all rows of a step are mirrored alike, so they still pair up
            first = n - 1 - (start + step * (count - 1))
            return slice(first, n - start, step)
        return slice(start, start + step * (count - 1) + 1, step)

    block = block or n
    steps = []
    for lo in range(0, n, block):
        if lo:
            steps.append((False, 1, (lo, 1, 1), (lo, 1, 1), (lo - 1, 1, 1)))
        steps.extend(_blelloch(lo, min(block, n - lo)))
    return tuple((p, s, rows(t), rows(f), rows(o)) for p, s, t, f, o in steps)


def _scan_ops(
    a: Tensor,
    b: Tensor,
    reverse: bool = False,
    work: Tensor | None = None,
    block: int | None = None,
) -> list[Callable[[], Any]]:
    """The vectorised steps of ``_scan_(a, b, reverse, work, block)``, bound to views of the
    tensors: binding once and calling the list for each chunk saves slicing every step."""
    if block is None:
        block = _SCAN_BLOCK if b.device.type == "cpu" else 0
    w = a if work is None else work
    ops: list[Callable[[], Any]] = []
    for is_product, s, target, left, right in _scan_plan(b.shape[0], reverse, block):
        src = a if s == 1 else w
        if is_product:
            ops.append(functools.partial(torch.mul, src[left], src[right], out=w[target]))
        else:
            ops.append(functools.partial(b[target].addcmul_, src[left], b[right]))
    return ops


def _scan_(
    a: Tensor,
    b: Tensor,
    reverse: bool = False,
    work: Tensor | None = None,
    block: int | None = None,
) -> None:
    """In-place inclusive scan over dim 0 (n rows): ``b[i] += a[i] * b[i-1]``.

    With ``reverse`` the recurrence runs backwards, ``b[i] += a[i] * b[i+1]``. The rows are
    scanned in blocks of ``block`` rows (0: all n in one; default ``_SCAN_BLOCK`` on CPU, one
    block on GPUs), each by Blelloch's work-efficient scheme, ``2 log2(block)`` vectorised
    steps, after one step that carries the last row of the block before into its first.
    Small blocks do less arithmetic in more, smaller steps (per row, about 1.5 row updates
    in blocks of 4, 1.9 in one block of 8, up to 3 in long blocks), which suits CPUs; GPUs
    want few steps. The products of decays over spans of 2+ rows that are needed go to ``work``
    (same shape as ``a``), or overwrite ``a`` when ``work`` is None. ``a``'s first row in
    scan order never reaches ``b``.
    """
    for op in _scan_ops(a, b, reverse, work, block):
        op()


# --------------------------------------------------------------------------- chunked scan


def _carve(buf: Tensor, *shape: int) -> Tensor:
    """A contiguous ``shape`` tensor on the first elements of the flat scratch buffer ``buf``."""
    count = 1
    for size in shape:
        count *= size
    return buf[:count].view(shape)


def _steps(t: Tensor, t0: int, t1: int) -> Tensor:
    """Steps ``t0:t1`` of ``t`` (batch, dim, L) as a (batch, t1 - t0, dim) view."""
    return t[..., t0:t1].transpose(1, 2)


def _blocks(length: int, T: int, reverse: bool = False):
    """``(k, s0, s1, [(c, t0, t1), ...])``: block k, steps ``s0:s1``, of whole chunks c, the
    unit in which layouts change and in which tensors are kept for the backward pass."""
    step = T * max(1, _BLOCK_STEPS // T)
    starts = list(enumerate(range(0, length, step)))
    for k, s0 in reversed(starts) if reverse else starts:
        s1 = min(length, s0 + step)
        chunks = [(t0 // T, t0, min(s1, t0 + T)) for t0 in range(s0, s1, T)]
        yield k, s0, s1, chunks[::-1] if reverse else chunks


def _chunk_major(t: Tensor, T: int) -> Tensor:
    """(b, g, N, L) -> zero-padded (chunks, b, T, g, N), so chunk c's steps are contiguous."""
    batch, groups, nstate, length = t.shape
    n_chunks = -(-length // T)
    padded = F.pad(t, (0, n_chunks * T - length)).view(batch, groups, nstate, n_chunks, T)
    return padded.permute(3, 0, 4, 1, 2).contiguous()


def _from_chunk_major(t: Tensor, length: int) -> Tensor:
    """(chunks, b, T, g, N) -> (b, g, N, L): the inverse of :func:`_chunk_major`."""
    n_chunks, batch, T, groups, nstate = t.shape
    out = t.permute(1, 3, 4, 0, 2).reshape(batch, groups, nstate, n_chunks * T)
    return out[..., :length].contiguous()


def _chunk_views(t: Tensor, length: int) -> tuple[list[Tensor], list[Tensor]]:
    """Per chunk c of ``t`` (chunks, b, T, g, N), views of its steps: (b, n, g, N, 1), to
    broadcast over channels, and (b n g, 1, N) matrices (a copy for a short last chunk)."""
    n_chunks, batch, T, groups, nstate = t.shape
    cols = list(t.unsqueeze(-1).unbind(0))
    mats = list(t.view(n_chunks, -1, 1, nstate).unbind(0))
    last = length - (n_chunks - 1) * T
    if last < T:
        cols[-1] = cols[-1][:, :last]
        mats[-1] = t[-1, :, :last].reshape(-1, 1, nstate)
    return cols, mats


class _Work:
    """Scratch tensors for a chunk of n steps of a tile of batch elements, as views of flat
    buffers, and the steps of the scans bound to them; rebuilt when the shape changes."""

    def __init__(self, like: Tensor, tile: int, length: int, T: int,
                 dims: tuple[int, int, int], backward: bool) -> None:
        groups, nstate, heads = dims
        rows = min(T, length)
        size = tile * rows * groups * nstate * heads
        steps = tile * rows * groups * heads
        block = tile * min(length, T * max(1, _BLOCK_STEPS // T)) * groups * heads
        if backward:
            # a: one spare decay row per batch element, (b, n + 1, ...), whose row i + 1 is
            # the decay that multiplies lam[i + 1] into lam[i] (the last one is never used).
            self.bufs = {"a": like.new_zeros(size + tile * groups * nstate * heads)}
            self.bufs.update((k, like.new_empty(size)) for k in ("s", "h", "lam"))
            self.bufs.update((k, like.new_empty(steps)) for k in ("du", "gy", "r", "y"))
            self.bufs["bc"] = like.new_empty(tile * rows * groups * nstate)
            self.bufs["g_blk"] = like.new_empty(block)
            self.d_A = like.new_zeros(size)  # sum over chunks of w * delta
        else:
            self.bufs = {"a": like.new_empty(size), "x": like.new_empty(size),
                         "y": like.new_empty(steps), "d_blk": like.new_empty(block),
                         "du_blk": like.new_empty(block)}
        self.dims, self.backward, self.shape = dims, backward, (-1, -1)

    def resize(self, batch: int, n: int) -> None:
        """Make the views and bound scan steps for chunks of n steps of ``batch`` elements."""
        if (batch, n) == self.shape:
            return
        self.shape = (batch, n)
        groups, nstate, heads = self.dims
        m = batch * n * groups
        shape = (batch, n, groups, nstate, heads)
        rows = lambda t: t.transpose(0, 1)  # noqa: E731  (n, batch, ...): the scanned rows
        bufs = self.bufs
        if not self.backward:
            self.a, self.x = _carve(bufs["a"], *shape), _carve(bufs["x"], *shape)
            self.a0, self.x0, self.x_last = self.a[:, 0], self.x[:, 0], self.x[:, n - 1]
            self.x_ops = _scan_ops(rows(self.a), rows(self.x))
            self.y = _carve(bufs["y"], batch, n, groups * heads)
            self.y_mat, self.x_mat = self.y.view(m, 1, heads), self.x.view(m, nstate, heads)
            return
        self.du = _carve(bufs["du"], batch, n, groups * heads)
        self.du5, self.du_mat = self.du.view(batch, n, groups, 1, heads), self.du.view(m, 1, heads)
        self.bc_mat = _carve(bufs["bc"], m, 1, nstate)
        full = _carve(bufs["a"], batch, n + 1, groups, nstate, heads)
        self.a = full[:, :n]
        self.s, self.h, self.lam = (_carve(bufs[k], *shape) for k in ("s", "h", "lam"))
        self.a0, self.h0, self.lam0, self.lam_last = self.a[:, 0], self.h[:, 0], self.lam[:, 0], \
            self.lam[:, n - 1]
        self.lam_tail, self.h_head = self.lam[:, 1:], self.h[:, : n - 1]
        self.h_ops = _scan_ops(rows(self.a), rows(self.h), work=rows(self.s))
        self.lam_ops = _scan_ops(rows(full[:, 1:]), rows(self.lam), reverse=True,
                                 work=rows(self.s))
        self.gy = _carve(bufs["gy"], batch, n, groups * heads)
        self.gy5, self.gy_mat = self.gy.view(batch, n, groups, 1, heads), self.gy.view(m, 1, heads)
        self.r = _carve(bufs["r"], batch, n, groups * heads)
        self.r_mat = self.r.view(m, 1, heads)
        self.e = _carve(bufs["y"], batch, n, groups, heads)
        self.e_flat = self.e.view(batch, n, groups * heads)
        self.h_matT = self.h.view(m, nstate, heads).transpose(1, 2)
        self.lam_mat = self.lam.view(m, nstate, heads)
        self.lam_matT = self.lam_mat.transpose(1, 2)
        self.d_A_n = _carve(self.d_A, *shape)

    def block(self, name: str, t: Tensor, s0: int, s1: int) -> Tensor:
        """Steps ``s0:s1`` of ``t`` (batch, dim, L), copied into a (batch, s1 - s0, dim) buffer."""
        out = _carve(self.bufs[name], t.shape[0], s1 - s0, t.shape[1])
        return out.copy_(_steps(t, s0, s1))


def _chunked_forward(
    u: Tensor,
    delta: Tensor,
    A2: Tensor,
    B_c: Tensor,
    C_c: Tensor,
    T: int,
    work: _Work,
    y: Tensor,
    last: Tensor,
    saved: list[Tensor] | None,
) -> None:
    """The scan of a tile of batch elements, into ``y`` (b, d, L) and ``last`` (b, g, N, d/g).

    u, delta (b, d, L); A2 = A log2(e) as (g, N, d/g); B_c, C_c (chunks, b, T, g, N).
    ``saved``, when given, receives for the backward pass, per block of chunks (see
    :func:`_blocks`), the state entering each of its chunks (chunks, b, g, N, d/g) and its
    steps of u and delta batch-time-major (b, steps, d): kept in pieces of a few MB, which
    the allocator recycles. A chunk is held batch-time-major as (b, T, g, N, d/g): channels
    innermost, so every elementwise op and reduction runs over long contiguous rows.
    """
    batch, dim, length = u.shape
    groups, nstate, heads = A2.shape
    n_chunks = B_c.shape[0]
    per_block = max(1, _BLOCK_STEPS // T)
    if saved is not None:
        for _, s0, s1, chunks in _blocks(length, T):
            saved += [last.new_empty(len(chunks), *last.shape),
                      *(u.new_empty(batch, s1 - s0, dim) for _ in range(2))]
        saved[0][0].zero_()
        slots = saved[::3]
    else:
        slots = [last.new_empty(2, *last.shape)]
    B5, _ = _chunk_views(B_c, length)
    _, C_mats = _chunk_views(C_c, length)
    y_steps = y.transpose(1, 2).split(T, 1)
    prev = None  # the state entering the chunk; None: zero
    for k, s0, s1, chunks in _blocks(length, T):
        du_blk = _carve(work.bufs["du_blk"], batch, s1 - s0, dim)
        if saved is not None:
            d_blk = saved[3 * k + 2].copy_(_steps(delta, s0, s1))
            torch.mul(saved[3 * k + 1].copy_(_steps(u, s0, s1)), d_blk, out=du_blk)
        else:
            d_blk = work.block("d_blk", delta, s0, s1)
            torch.mul(_steps(u, s0, s1), d_blk, out=du_blk)
        d5s = d_blk.view(batch, s1 - s0, groups, 1, heads).split(T, 1)
        du5s = du_blk.view(batch, s1 - s0, groups, 1, heads).split(T, 1)
        for j, (c, t0, t1) in enumerate(chunks):
            work.resize(batch, t1 - t0)
            a = work.a
            torch.mul(d5s[j], A2, out=a).exp2_()
            torch.mul(du5s[j], B5[c], out=work.x)
            if prev is not None:
                work.x0.addcmul_(work.a0, prev)
            for op in work.x_ops:
                op()
            torch.bmm(C_mats[c], work.x_mat, out=work.y_mat)
            y_steps[c].copy_(work.y)
            if c + 1 == n_chunks:
                prev = last
            elif saved is not None:
                prev = slots[(c + 1) // per_block][(c + 1) % per_block]
            else:
                prev = slots[0][(c + 1) % 2]
            prev.copy_(work.x_last)


def _chunked_backward(
    g_y: Tensor | None,
    carry: Tensor,
    saved: list[Tensor],
    A_t: Tensor,
    B_c: Tensor,
    C_c: Tensor,
    T: int,
    work: _Work,
    grads: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
) -> None:
    """Gradients of a tile of batch elements, into ``grads`` = (du, ddelta (b, d, L),
    dA_t (g, N, d/g), added to, dB_c, dC_c (chunks, b, T, g, N)).

    ``g_y`` (b, d, L) is the gradient of y (None: zero), ``carry`` (b, g, N, d/g) that of
    the last state (overwritten); ``saved`` as filled by :func:`_chunked_forward`. Chunks are
    visited last to first; each recomputes its decays and states from the state entering it
    and solves the adjoint recurrence ``lam_t = C_t gy_t + exp(delta_{t+1} A) lam_{t+1}`` by
    a reversed parallel scan.
    """
    d_u, d_delta, d_A, d_B, d_C = grads
    batch, _, length = d_u.shape
    groups, nstate, heads = A_t.shape
    A2 = A_t * _LOG2E
    (B5, B_mats), (C5, _) = _chunk_views(B_c, length), _chunk_views(C_c, length)
    d_B_mats, d_C_mats = (list(t.view(t.shape[0], -1, 1, nstate).unbind(0)) for t in (d_B, d_C))
    d_u_steps, d_delta_steps = (t.transpose(1, 2).split(T, 1) for t in (d_u, d_delta))
    work.d_A.zero_()
    for k, s0, s1, chunks in _blocks(length, T, reverse=True):
        starts, u_blk, d_blk = saved[3 * k : 3 * k + 3]
        u_cs, d_cs = u_blk.split(T, 1), d_blk.split(T, 1)
        d5s = d_blk.view(batch, s1 - s0, groups, 1, heads).split(T, 1)
        if g_y is not None:
            g_cs = work.block("g_blk", g_y, s0, s1).split(T, 1)
        c0 = chunks[-1][0]
        for c, t0, t1 in chunks:
            n, j = t1 - t0, c - c0
            work.resize(batch, n)
            a, h, lam, start = work.a, work.h, work.lam, starts[j]
            u_c, d_c, delta5 = u_cs[j], d_cs[j], d5s[j]
            full = n == T
            torch.mul(d_c, u_c, out=work.du)
            # States of this chunk, recomputed from the state entering it.
            torch.mul(delta5, A2, out=a).exp2_()
            torch.mul(work.du5, B5[c], out=h)
            if c:
                work.h0.addcmul_(work.a0, start)
            for op in work.h_ops:
                op()
            # y_t = <C_t, h_t>: dC sums h * gy over the channels of a group; the inputs
            # x_t = delta_t u_t B_t give dB (sum of lam * delta u) and r = <B_t, lam_t>,
            # which feeds du and ddelta.
            if g_y is None:
                lam.zero_()
            else:
                work.gy.copy_(g_cs[j])
                if full:
                    torch.bmm(work.gy_mat, work.h_matT, out=d_C_mats[c])
                else:
                    d_C[c, :, :n] = torch.bmm(work.gy_mat, work.h_matT, out=work.bc_mat).view(
                        batch, n, groups, nstate)
                torch.mul(work.gy5, C5[c], out=lam)
            # Adjoint states lam_t = dL/dh_t, scanned backwards: lam[i] += a[i+1] * lam[i+1].
            work.lam_last.add_(carry)
            for op in work.lam_ops:
                op()
            torch.mul(work.a0, work.lam0, out=carry)
            if full:
                torch.bmm(work.du_mat, work.lam_matT, out=d_B_mats[c])
            else:
                d_B[c, :, :n] = torch.bmm(work.du_mat, work.lam_matT, out=work.bc_mat).view(
                    batch, n, groups, nstate)
            torch.bmm(B_mats[c], work.lam_mat, out=work.r_mat)
            d_u_steps[c].copy_(torch.mul(work.r, d_c, out=work.du))
            # decay_t = exp(delta_t A): w = lam_t h_{t-1} decay_t = dL/d(delta_t A), in lam.
            w = lam.mul_(a)
            if n > 1:
                work.lam_tail.mul_(work.h_head)
            if c:
                work.lam0.mul_(start)
            else:
                work.lam0.zero_()
            work.d_A_n.addcmul_(w, delta5)
            torch.sum(w.mul_(A_t), -2, out=work.e)
            d_delta_steps[c].copy_(work.e_flat.addcmul_(work.r, u_c))
    rows = work.d_A.numel() // (groups * nstate * heads)
    d_A.add_(work.d_A.view(rows, groups, nstate, heads).sum(0))


class _ChunkedSelectiveScan(torch.autograd.Function):
    """Autograd wrapper of the chunked scan core (no D, z, bias or softplus)."""

    @staticmethod
    def forward(
        ctx: Any,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        T: int,
        grad_enabled: bool,
    ) -> tuple[Tensor, Tensor]:
        """(b, d, L) x2, (d, N), (b, g, N, L) x2 -> y (b, d, L), last state (b, d, N).

        ``grad_enabled`` (grad mode outside ``apply``) decides, with ``needs_input_grad``,
        whether the chunk-boundary states are kept for the backward pass.
        """
        batch, dim, length = u.shape
        groups, nstate = B.shape[1], B.shape[2]
        heads = dim // groups
        A_t = A.view(groups, heads, nstate).transpose(1, 2).contiguous()
        B_c, C_c = _chunk_major(B, T), _chunk_major(C, T)
        keep = grad_enabled and any(ctx.needs_input_grad[:5])
        tile = _batch_tile(batch, dim * nstate, T, u)
        work = _Work(u, tile, length, T, (groups, nstate, heads), backward=False)
        y = u.new_empty(batch, dim, length)
        last = u.new_empty(batch, groups, nstate, heads)
        A2 = A_t * _LOG2E
        saved: list[Tensor] = []  # per tile, kept for the backward pass
        for b0 in range(0, batch, tile):
            b = slice(b0, min(batch, b0 + tile))
            tile_saved = [] if keep else None
            _chunked_forward(u[b], delta[b], A2, B_c[:, b], C_c[:, b], T, work, y[b], last[b],
                             tile_saved)
            saved += tile_saved or []
        if keep:
            ctx.save_for_backward(A_t, B_c, C_c, *saved)
        ctx.T, ctx.length = T, length
        ctx.set_materialize_grads(False)
        return y, last.transpose(-1, -2).reshape(batch, dim, nstate)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_y: Tensor | None, g_last: Tensor | None) -> tuple:
        """Gradients for u, delta, A, B, C (None for the chunk length and grad flag)."""
        A_t, B_c, C_c, *saved = ctx.saved_tensors
        groups, nstate, heads = A_t.shape
        batch, dim, length, T, like = B_c.shape[1], groups * heads, ctx.length, ctx.T, A_t
        tile = saved[1].shape[0] if saved else 1  # no tile for an empty batch
        per_tile = len(saved) // max(1, -(-batch // tile))
        carry = like.new_zeros(batch, groups, nstate, heads)
        if g_last is not None:
            carry.copy_(g_last.reshape(batch, groups, heads, nstate).transpose(-1, -2))
        if g_y is not None:
            g_y = g_y.to(like.dtype)
        d_u, d_delta = like.new_empty(batch, dim, length), like.new_empty(batch, dim, length)
        d_A, d_B, d_C = torch.zeros_like(A_t), torch.zeros_like(B_c), torch.zeros_like(C_c)
        work = _Work(like, tile, length, T, (groups, nstate, heads), backward=True)
        for i, b0 in enumerate(range(0, batch, tile)):
            b = slice(b0, min(batch, b0 + tile))
            _chunked_backward(
                None if g_y is None else g_y[b], carry[b], saved[i * per_tile : (i + 1) * per_tile],
                A_t, B_c[:, b], C_c[:, b], T, work, (d_u[b], d_delta[b], d_A, d_B[:, b], d_C[:, b])
            )
        d_A = d_A.transpose(1, 2).reshape(groups * heads, nstate)
        d_B, d_C = _from_chunk_major(d_B, length), _from_chunk_major(d_C, length)
        return d_u, d_delta, d_A, d_B, d_C, None, None


def selective_scan_chunked(
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
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """(b, d, L) -> y (b, d, L) [, last_state (b, d, N)]: the pure-PyTorch chunked scan.

    Arguments and results as mamba-ssm's ``selective_scan_fn``; ``chunk_size`` (time steps
    per chunk) defaults to a device-dependent power of two. The last state is float32 for
    float16 and bfloat16 inputs (as in mamba-ssm), and unlike mamba-ssm its gradient is
    propagated.
    """
    dtype_in = u.dtype
    u_c, delta_c, A_c, B_c, C_c = prepare_inputs(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    if chunk_size is None:
        chunk_size = _chunk_size(batch * dim * A.shape[1], length, u.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if length == 0:
        y = u_c.new_zeros(batch, dim, 0)
        last = u_c.new_zeros(batch, dim, A.shape[1])
    else:
        y, last = _ChunkedSelectiveScan.apply(
            u_c, delta_c, A_c, B_c, C_c, chunk_size, torch.is_grad_enabled()
        )
    out = finish_output(y, u_c, D, z, dtype_in)
    return (out, last) if return_last_state else out
