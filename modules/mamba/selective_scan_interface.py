"""Selective scan (Mamba S6) and causal depthwise convolution, with kernel dispatch.

Shapes follow ``mamba_ssm.ops.selective_scan_interface``: ``u``, ``delta``, ``z`` are
(batch, dim, L); ``A`` is (dim, N), real; ``B``, ``C`` are (batch, N, L) or
(batch, groups, N, L), where channel ``d`` uses group ``d // (dim // groups)``; ``D`` and
``delta_bias`` are (dim,). The recurrence, per batch element, channel ``d`` and state ``n``::

    delta = softplus(delta + delta_bias)          # bias and softplus optional
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t   = <h_t, C_t> + D * u_t                  # then y_t *= silu(z_t) when z is given

Three implementations, chosen in one place (:func:`resolve_scan_impl`):

* ``cuda``: mamba-ssm's fused CUDA kernel, used when ``mamba_ssm`` imports and the tensors
  are on a CUDA device;
* ``torch``: :func:`selective_scan_chunked`, a pure-PyTorch chunked parallel scan that runs
  on CPU, Apple MPS and CUDA;
* ``ref``: :func:`selective_scan_ref`, a plain loop over time steps (the test oracle).

``auto`` (the default) picks ``cuda`` when possible and ``torch`` otherwise. The environment
variable ``MAMBA_ASR_SCAN_IMPL`` (``auto``/``cuda``/``torch``/``ref``) or the ``impl=``
argument forces a path; the same setting selects the causal convolution (``causal_conv1d``'s
CUDA kernel, ``F.conv1d``, or a sequential reference). Which path runs is logged once.

The chunked scan splits time into chunks of ``T`` steps (a power of two picked per device,
:func:`_chunk_size`) and keeps a chunk time-major as (T, batch, groups, N, dim/groups), so
each time step is one long contiguous row. Inside a chunk the linear recurrence is solved by
a work-efficient (Blelloch) parallel scan, ``2 ceil(log2 T)`` vectorised steps over the pairs
(decay, input), not a loop over time steps; the state is carried from one chunk to the next
by a short loop over chunks. Stability: the scan works on the decays ``exp(delta_t A)``
themselves, computed once per step from ``delta_t A`` (<= 0 for the usual ``delta >= 0``,
``A < 0``), and only multiplies them together. Products of numbers in [0, 1] may underflow
to zero where the true value is negligible, but never overflow, and unlike differences of
cumulative sums of log-decays they lose no precision on long or stiff sequences; no
exponential of a positive number is ever taken, however large ``delta`` or ``|A|``. The
backward pass keeps only the chunk-boundary states from the forward pass, recomputes each
chunk's states from them and runs the adjoint recurrence as a reversed parallel scan, so its
memory is one chunk of states plus L/T boundary states, never all (batch, dim, L, N) states.
Internally it computes in float32 (float64 for float64 inputs, except on MPS, which has no
float64); float16 and bfloat16 inputs are accepted and y is returned in their dtype.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "ENV_VAR",
    "IMPLS",
    "causal_conv1d_fn",
    "causal_conv1d_ref",
    "kernel_status",
    "resolve_conv_impl",
    "resolve_scan_impl",
    "selective_scan_chunked",
    "selective_scan_fn",
    "selective_scan_ref",
]

logger = logging.getLogger(__name__)

ENV_VAR = "MAMBA_ASR_SCAN_IMPL"
IMPLS = ("auto", "cuda", "torch", "ref")
SCAN_PATHS = {
    "cuda": "mamba-ssm CUDA kernel",
    "torch": "PyTorch chunked parallel scan",
    "ref": "PyTorch sequential reference",
}
CONV_PATHS = {
    "cuda": "causal-conv1d CUDA kernel",
    "torch": "PyTorch conv1d",
    "ref": "PyTorch sequential reference",
}
# Elements of one (T, batch, dim, N) chunk buffer the chunked scan aims for (see _chunk_size).
# On CPU, 4 MB float32 buffers keep a chunk's working set in the last-level cache: T = 8
# for batch 8 x dim 1024 x N 16, measured fastest together with T = 4, whose chunk-boundary
# states (kept for the backward pass) would take twice the memory.
_CPU_CHUNK_ELEMENTS = 1 << 20
_GPU_CHUNK_ELEMENTS = 1 << 23
_MIN_CHUNK, _MAX_CHUNK = 8, 1024
_LOG2E = 1.4426950408889634
_announced: set[tuple[str, str]] = set()

Tensor = torch.Tensor


# --------------------------------------------------------------------------- dispatch


@functools.cache
def _load_mamba_ssm() -> tuple[Callable[..., Any] | None, str]:
    """mamba-ssm's CUDA ``selective_scan_fn`` and "ok", or None and why it is unavailable."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fn
    except Exception as exc:  # ImportError, or OSError/RuntimeError from a mismatched build
        return None, f"{type(exc).__name__}: {exc}"
    return fn, "ok"


@functools.cache
def _load_causal_conv1d() -> tuple[Callable[..., Any] | None, str]:
    """causal-conv1d's CUDA ``causal_conv1d_fn`` and "ok", or None and why it is unavailable."""
    try:
        from causal_conv1d import causal_conv1d_fn as fn
    except Exception as exc:  # ImportError, or OSError/RuntimeError from a mismatched build
        return None, f"{type(exc).__name__}: {exc}"
    return fn, "ok"


def requested_impl(impl: str | None = None) -> str:
    """The requested implementation: ``impl`` if given, else ``$MAMBA_ASR_SCAN_IMPL``, else auto."""
    value = impl if impl is not None else os.environ.get(ENV_VAR, "auto")
    value = value.strip().lower() or "auto"
    if value not in IMPLS:
        source = "impl argument" if impl is not None else ENV_VAR
        raise ValueError(f"{source}={value!r}: expected one of {', '.join(IMPLS)}")
    return value


def _resolve(
    kind: str, device: torch.device | str, impl: str | None, loader: Callable[[], tuple]
) -> str:
    """Shared logic of :func:`resolve_scan_impl` and :func:`resolve_conv_impl`."""
    choice = requested_impl(impl)
    device_type = torch.device(device).type
    if choice == "auto":
        return "cuda" if device_type == "cuda" and loader()[0] is not None else "torch"
    if choice == "cuda":
        package = "mamba-ssm" if kind == "scan" else "causal-conv1d"
        fn, reason = loader()
        if fn is None:
            raise RuntimeError(
                f"{ENV_VAR}/impl='cuda' needs the {package} CUDA kernels, which do not import "
                f"({reason}). Install them (pip install -r requirements-cuda.txt "
                f"--no-build-isolation) or use impl 'auto' or 'torch'."
            )
        if device_type != "cuda":
            raise RuntimeError(
                f"{ENV_VAR}/impl='cuda' runs the {package} kernels, which need CUDA tensors; "
                f"got tensors on {device_type}. Use impl 'auto' or 'torch'."
            )
    return choice


def resolve_scan_impl(device: torch.device | str, impl: str | None = None) -> str:
    """Selective-scan path for tensors on ``device``: "cuda", "torch" or "ref"."""
    return _resolve("scan", device, impl, _load_mamba_ssm)


def resolve_conv_impl(device: torch.device | str, impl: str | None = None) -> str:
    """Causal-convolution path for tensors on ``device``: "cuda", "torch" or "ref"."""
    return _resolve("conv", device, impl, _load_causal_conv1d)


def _announce(kind: str, path: str, device: torch.device) -> None:
    """Log, once per (kind, path), which implementation runs."""
    names = SCAN_PATHS if kind == "scan" else CONV_PATHS
    if (kind, path) not in _announced:
        _announced.add((kind, path))
        logger.info("%s: using the %s (device %s)", kind, names[path], device.type)


def kernel_status(device: torch.device | str | None = None) -> dict[str, str]:
    """Which selective-scan and causal-conv paths run on ``device`` (default: cuda if present).

    Returns ``{"requested", "scan", "conv", "mamba_ssm", "causal_conv1d"}`` as readable
    strings; a forced path that cannot run is reported as ``"error: ..."`` instead of raising.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    status = {
        "mamba_ssm": _load_mamba_ssm()[1],
        "causal_conv1d": _load_causal_conv1d()[1],
    }
    try:
        status["requested"] = requested_impl()
    except ValueError as exc:
        status["requested"] = f"error: {exc}"
        status["scan"] = status["conv"] = f"error: {exc}"
        return status
    for kind, resolve, names in (
        ("scan", resolve_scan_impl, SCAN_PATHS),
        ("conv", resolve_conv_impl, CONV_PATHS),
    ):
        try:
            status[kind] = names[resolve(device)]
        except RuntimeError as exc:
            status[kind] = f"error: {exc}"
    return status


# --------------------------------------------------------------------------- helpers


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


def _chunk_size(rows: int, length: int, device: torch.device) -> int:
    """Chunk length T: a power of two whose (T, rows) buffer stays cache/launch friendly."""
    budget = _CPU_CHUNK_ELEMENTS if device.type == "cpu" else _GPU_CHUNK_ELEMENTS
    t = 1 << max(0, (budget // max(rows, 1)).bit_length() - 1)
    t = min(max(t, _MIN_CHUNK), _MAX_CHUNK)
    return max(1, min(t, length))


def _rows(t: Tensor, start: int, step: int, count: int, n: int, reverse: bool) -> Tensor:
    """Rows ``start, start + step, ...`` (``count`` of them) of ``t``, mirrored if reverse."""
    if reverse:
        first = n - 1 - (start + step * (count - 1))
        return t[first : n - start : step]
    return t[start : start + step * (count - 1) + 1 : step]


def _scan_(a: Tensor, b: Tensor, reverse: bool = False, work: Tensor | None = None) -> None:
    """In-place inclusive scan over dim 0 (n rows): ``b[i] += a[i] * b[i-1]``.

    With ``reverse`` the recurrence runs backwards, ``b[i] += a[i] * b[i+1]``. Blelloch's
    work-efficient scheme in ``2 ceil(log2 n)`` vectorised steps: the up-sweep leaves in row
    ``i`` the combination of the span of ``lowbit(i + 1)`` rows ending at ``i``; the
    down-sweep completes the remaining rows from the coarsest span down. The products of
    decays over spans of 2+ rows go to ``work`` (same shape as ``a``), or overwrite ``a``
    when ``work`` is None. ``a``'s first row in scan order never reaches ``b``.
    """
    n = b.shape[0]
    spans = []
    w = a if work is None else work
    s = 1
    while 2 * s <= n:
        cnt = n // (2 * s)
        src = a if s == 1 else w  # rows holding the decay of a span of s rows
        b_r = _rows(b, 2 * s - 1, 2 * s, cnt, n, reverse)
        src_r = _rows(src, 2 * s - 1, 2 * s, cnt, n, reverse)
        src_l = _rows(src, s - 1, 2 * s, cnt, n, reverse)
        b_r.addcmul_(src_r, _rows(b, s - 1, 2 * s, cnt, n, reverse))
        if 4 * s <= n or 6 * s - 1 < n:  # the decays of spans of 2s rows are used later
            torch.mul(src_r, src_l, out=_rows(w, 2 * s - 1, 2 * s, cnt, n, reverse))
        spans.append(s)
        s *= 2
    for s in reversed(spans):
        if 3 * s - 1 >= n:
            continue
        cnt = (n - 3 * s) // (2 * s) + 1
        src = a if s == 1 else w
        b_j = _rows(b, 3 * s - 1, 2 * s, cnt, n, reverse)
        b_j.addcmul_(_rows(src, 3 * s - 1, 2 * s, cnt, n, reverse),
                     _rows(b, 2 * s - 1, 2 * s, cnt, n, reverse))


# --------------------------------------------------------------------------- chunked scan


def _time_major(t: Tensor) -> Tensor:
    """(..., L) -> contiguous (L, ...); uses a fast 2-D transpose for contiguous inputs."""
    moved = t.movedim(-1, 0)
    if moved.is_contiguous():
        return moved
    if t.is_contiguous():
        return t.reshape(-1, t.shape[-1]).t().contiguous().view(moved.shape)
    return moved.contiguous()


def _from_time_major(t: Tensor) -> Tensor:
    """Contiguous (L, ...) -> contiguous (..., L), by a fast 2-D transpose."""
    return t.reshape(t.shape[0], -1).t().contiguous().view(*t.shape[1:], t.shape[0])


def _chunked_forward(
    u_t: Tensor, delta_t: Tensor, A_t: Tensor, B_t: Tensor, C_t: Tensor, T: int, keep: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Time-major scan: u_t, delta_t (L, b, d); A_t (g, N, d/g); B_t, C_t (L, b, g, N).

    Returns y_t (L, b, d), the last state (b, g, N, d/g) and, when ``keep``, the state
    entering each chunk (chunks, b, g, N, d/g). Chunk buffers are (T, b, g, N, d/g): channels
    innermost, so every elementwise op and reduction runs over long contiguous rows.
    """
    length, batch, dim = u_t.shape
    groups, nstate, heads = A_t.shape
    n_chunks = -(-length // T)
    rows = min(T, length)
    A2_t = A_t * _LOG2E  # exp(x) = exp2(x log2 e), and exp2 is several times faster
    a_buf = u_t.new_empty(rows, batch, groups, nstate, heads)
    h_buf = torch.empty_like(a_buf)
    du_buf = u_t.new_empty(rows, batch, dim)
    y_t = u_t.new_empty(length, batch, dim)
    # states[c]: the state entering chunk c (two alternating slots when not kept)
    states = u_t.new_empty(n_chunks + 1 if keep else 2, batch, groups, nstate, heads)
    states[0].zero_()
    slot = (lambda c: c) if keep else (lambda c: c % 2)
    for c in range(n_chunks):
        t0, t1 = c * T, min(length, (c + 1) * T)
        n = t1 - t0
        m = n * batch * groups
        a, x = a_buf[:n], h_buf[:n]
        du = torch.mul(delta_t[t0:t1], u_t[t0:t1], out=du_buf[:n])
        torch.mul(delta_t[t0:t1].view(n, batch, groups, 1, heads), A2_t, out=a).exp2_()
        torch.mul(du.view(n, batch, groups, 1, heads), B_t[t0:t1].unsqueeze(-1), out=x)
        x[0].addcmul_(a[0], states[slot(c)])
        _scan_(a, x)
        torch.bmm(C_t[t0:t1].view(m, 1, nstate), x.view(m, nstate, heads),
                  out=y_t[t0:t1].view(m, 1, heads))
        states[slot(c + 1)].copy_(x[n - 1])
    return y_t, states[slot(n_chunks)], states[:n_chunks] if keep else None


def _chunked_backward(
    gy_t: Tensor,
    carry: Tensor,
    u_t: Tensor,
    delta_t: Tensor,
    A_t: Tensor,
    B_t: Tensor,
    C_t: Tensor,
    starts: Tensor,
    T: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Time-major gradients: du_t, ddelta_t (L, b, d), dA_t (g, N, d/g), dB_t, dC_t (L, b, g, N).

    ``gy_t`` (L, b, d) is the gradient of y and ``carry`` (b, g, N, d/g) that of the last
    state (overwritten). Chunks are visited last to first; each recomputes its states from
    ``starts`` and solves the adjoint recurrence ``lam_t = C_t gy_t + exp(delta_{t+1} A)
    lam_{t+1}`` by a reversed parallel scan.
    """
    length, batch, dim = u_t.shape
    groups, nstate, heads = A_t.shape
    n_chunks = starts.shape[0]
    rows = min(T, length)
    A2_t = A_t * _LOG2E
    du_buf = u_t.new_empty(rows, batch, dim)
    # One spare row: a_buf[i + 1] is the decay that multiplies lam[i + 1] into lam[i].
    a_buf = u_t.new_zeros(rows + 1, batch, groups, nstate, heads)
    s_buf, h_buf, lam_buf = (torch.empty_like(a_buf[:rows]) for _ in range(3))
    d_A_acc = torch.zeros_like(a_buf[:rows])  # sum over chunks of w * delta, (T, b, g, N, d/g)
    r_buf = u_t.new_empty(rows, batch, dim)
    d_u, d_delta = torch.empty_like(u_t), torch.empty_like(u_t)
    d_B, d_C = torch.empty_like(B_t), torch.empty_like(C_t)
    for c in reversed(range(n_chunks)):
        t0, t1 = c * T, min(length, (c + 1) * T)
        n = t1 - t0
        m = n * batch * groups
        a, s, h, lam = a_buf[:n], s_buf[:n], h_buf[:n], lam_buf[:n]
        r = r_buf[:n]
        delta5 = delta_t[t0:t1].view(n, batch, groups, 1, heads)
        du = torch.mul(delta_t[t0:t1], u_t[t0:t1], out=du_buf[:n])
        # States of this chunk, recomputed from the state entering it.
        torch.mul(delta5, A2_t, out=a).exp2_()
        torch.mul(du.view(n, batch, groups, 1, heads), B_t[t0:t1].unsqueeze(-1), out=h)
        h[0].addcmul_(a[0], starts[c])
        _scan_(a, h, work=s)
        # Adjoint states lam_t = dL/dh_t, scanned backwards: lam[i] += a[i + 1] * lam[i + 1].
        gy5 = gy_t[t0:t1].view(n, batch, groups, 1, heads)
        torch.mul(gy5, C_t[t0:t1].unsqueeze(-1), out=lam)
        lam[n - 1].add_(carry)
        _scan_(a_buf[1 : n + 1], lam, reverse=True, work=s)
        torch.mul(a[0], lam[0], out=carry)
        # y_t = <C_t, h_t>: dC sums h * gy over the channels of a group; x_t = delta_t u_t B_t
        # gives dB (sum of lam * delta u) and <B_t, lam_t>, which feeds du and ddelta.
        torch.bmm(gy_t[t0:t1].view(m, 1, heads), h.view(m, nstate, heads).transpose(1, 2),
                  out=d_C[t0:t1].view(m, 1, nstate))
        torch.bmm(du.view(m, 1, heads), lam.view(m, nstate, heads).transpose(1, 2),
                  out=d_B[t0:t1].view(m, 1, nstate))
        torch.bmm(B_t[t0:t1].view(m, 1, nstate), lam.view(m, nstate, heads),
                  out=r.view(m, 1, heads))
        torch.mul(r, delta_t[t0:t1], out=d_u[t0:t1])
        torch.mul(r, u_t[t0:t1], out=d_delta[t0:t1])
        # decay_t = exp(delta_t A): w = lam_t * h_{t-1} * decay_t = dL/d(delta_t A).
        w = torch.mul(lam, a, out=s)
        if n > 1:
            w[1:].mul_(h[: n - 1])
        w[0].mul_(starts[c])
        d_delta[t0:t1].add_(torch.mul(w, A_t, out=h).sum(-2).view(n, batch, dim))
        d_A_acc[:n].addcmul_(w, delta5)
    return d_u, d_delta, d_A_acc.sum((0, 1)), d_B, d_C


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
        batch, dim, _ = u.shape
        groups, nstate = B.shape[1], B.shape[2]
        heads = dim // groups
        A_t = A.view(groups, heads, nstate).transpose(1, 2).contiguous()
        u_t, delta_t = _time_major(u), _time_major(delta)
        B_t, C_t = _time_major(B), _time_major(C)
        keep = grad_enabled and any(ctx.needs_input_grad[:5])
        y_t, last, starts = _chunked_forward(u_t, delta_t, A_t, B_t, C_t, T, keep)
        if keep:
            ctx.save_for_backward(u_t, delta_t, A_t, B_t, C_t, starts)
        ctx.T = T
        ctx.set_materialize_grads(False)
        last = last.transpose(-1, -2).reshape(batch, dim, nstate).clone()  # not a view of states
        return _from_time_major(y_t), last

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_y: Tensor | None, g_last: Tensor | None) -> tuple:
        """Gradients for u, delta, A, B, C (None for the chunk length and grad flag)."""
        u_t, delta_t, A_t, B_t, C_t, starts = ctx.saved_tensors
        groups, nstate, heads = A_t.shape
        batch = u_t.shape[1]
        gy_t = torch.zeros_like(u_t) if g_y is None else _time_major(g_y.to(u_t.dtype))
        carry = u_t.new_zeros(batch, groups, nstate, heads)
        if g_last is not None:
            carry.copy_(g_last.reshape(batch, groups, heads, nstate).transpose(-1, -2))
        d_u, d_delta, d_A, d_B, d_C = _chunked_backward(
            gy_t, carry, u_t, delta_t, A_t, B_t, C_t, starts, ctx.T
        )
        d_A = d_A.transpose(1, 2).reshape(groups * heads, nstate)
        return (
            _from_time_major(d_u),
            _from_time_major(d_delta),
            d_A,
            _from_time_major(d_B),
            _from_time_major(d_C),
            None,
            None,
        )


def _prepare(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    delta_bias: Tensor | None,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Cast to the compute dtype, apply bias and softplus to delta, make B and C 4-D."""
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


def _finish(
    y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, dtype_in: torch.dtype
) -> Tensor:
    """Add the skip term ``D * u``, gate with ``silu(z)``, cast back to the input dtype."""
    if D is not None:
        y = y + u * D.to(y.dtype).unsqueeze(-1)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype_in)


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

    Arguments and results as :func:`selective_scan_fn`; ``chunk_size`` (time steps per chunk)
    defaults to a device-dependent power of two. The last state is float32 for float16 and
    bfloat16 inputs (as in mamba-ssm), and unlike mamba-ssm its gradient is propagated.
    """
    dtype_in = u.dtype
    u_c, delta_c, A_c, B_c, C_c = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
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
    out = _finish(y, u_c, D, z, dtype_in)
    return (out, last) if return_last_state else out


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
    every state for autograd, and is slow; arguments as :func:`selective_scan_fn`.
    """
    dtype_in = u.dtype
    u_c, delta_c, A_c, B_c, C_c = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    groups, nstate = B_c.shape[1], A.shape[1]
    heads = dim // groups
    A3 = A_c.view(groups, heads, nstate)
    # Time-major per-step factors, (L, b, g, d/g, N) / (L, b, g, 1, N).
    delta5 = delta_c.permute(2, 0, 1).reshape(length, batch, groups, heads, 1)
    u5 = u_c.permute(2, 0, 1).reshape(length, batch, groups, heads, 1)
    decay = torch.exp(delta5 * A3)
    drive = delta5 * u5 * B_c.permute(3, 0, 1, 2).unsqueeze(3)
    c_steps = C_c.permute(3, 0, 1, 2).unsqueeze(3).unbind(0)
    h = u_c.new_zeros(batch, groups, heads, nstate)
    ys = []
    for decay_t, drive_t, c_t in zip(decay.unbind(0), drive.unbind(0), c_steps, strict=True):
        h = decay_t * h + drive_t
        ys.append((h * c_t).sum(-1).reshape(batch, dim))
    y = torch.stack(ys, dim=-1) if ys else u_c.new_zeros(batch, dim, 0)
    out = _finish(y, u_c, D, z, dtype_in)
    return (out, h.reshape(batch, dim, nstate)) if return_last_state else out


def selective_scan_fn(
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
    impl: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """(b, d, L) -> y (b, d, L) [, last_state (b, d, N)]: the selective scan, dispatched.

    Same arguments and semantics as mamba-ssm's ``selective_scan_fn``: ``u``, ``delta``,
    ``z`` (batch, dim, L); ``A`` (dim, N) real; ``B``, ``C`` (batch, N, L) or
    (batch, groups, N, L); ``D``, ``delta_bias`` (dim,). ``y`` has the dtype of ``u``. ``impl``
    ("auto", "cuda", "torch", "ref") overrides ``$MAMBA_ASR_SCAN_IMPL``; see the module doc.
    """
    path = resolve_scan_impl(u.device, impl)
    _announce("scan", path, u.device)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if path == "cuda":
        return _load_mamba_ssm()[0](*args)
    if path == "ref":
        return selective_scan_ref(*args)
    return selective_scan_chunked(*args)


# --------------------------------------------------------------------------- causal conv


def _check_conv(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None) -> None:
    """Validate causal_conv1d_fn's arguments."""
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
    _check_conv(x, weight, bias, activation)
    k = weight.shape[1]
    padded = F.pad(x, (k - 1, 0))
    outs = [(padded[:, :, t : t + k] * weight).sum(-1) for t in range(x.shape[-1])]
    out = torch.stack(outs, dim=-1) if outs else torch.zeros_like(x)
    if bias is not None:
        out = out + bias.unsqueeze(-1)
    return F.silu(out) if activation is not None else out


def causal_conv1d_fn(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    impl: str | None = None,
) -> Tensor:
    """(b, d, L), (d, K), (d,) -> (b, d, L): causal depthwise conv, optional silu, dispatched.

    ``out[:, c, t] = act(bias[c] + sum_k weight[c, k] * x[:, c, t - K + 1 + k])`` with zeros
    before the start, as causal-conv1d's ``causal_conv1d_fn``; ``activation`` is None,
    "silu" or "swish". ``impl`` as in :func:`selective_scan_fn`.
    """
    _check_conv(x, weight, bias, activation)
    path = resolve_conv_impl(x.device, impl)
    _announce("conv", path, x.device)
    if path == "cuda":
        return _load_causal_conv1d()[0](x, weight, bias, activation=activation)
    if path == "ref":
        return causal_conv1d_ref(x, weight, bias, activation)
    k = weight.shape[1]
    out = F.conv1d(F.pad(x, (k - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out) if activation is not None else out
