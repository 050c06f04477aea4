"""Selective scan (Mamba S6) and causal depthwise convolution, with kernel dispatch.

mamba-ssm's public names (``selective_scan_fn``, ``selective_scan_ref``) and
causal-conv1d's (``causal_conv1d_fn``, ``causal_conv1d_ref``) with their semantics, on any
device. Shapes follow ``mamba_ssm.ops.selective_scan_interface``: ``u``, ``delta``, ``z`` are
(batch, dim, L); ``A`` is (dim, N), real; ``B``, ``C`` are (batch, N, L) or
(batch, groups, N, L), where channel ``d`` uses group ``d // (dim // groups)``; ``D`` and
``delta_bias`` are (dim,). The recurrence, per batch element, channel ``d`` and state ``n``::

    delta = softplus(delta + delta_bias)          # bias and softplus optional
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t   = <h_t, C_t> + D * u_t                  # then y_t *= silu(z_t) when z is given

Four implementations, chosen in one place (:func:`resolve_scan_impl`):

* ``cuda``: mamba-ssm's fused CUDA kernel, used when ``mamba_ssm`` imports and the tensors
  are on a CUDA device;
* ``torch``: :func:`selective_scan_chunked` (:mod:`selective_scan_chunked`), a pure-PyTorch
  chunked parallel scan that runs on CPU, Apple MPS and CUDA;
* ``ref``: :func:`selective_scan_ref` (:mod:`selective_scan_ref`), a plain loop over time
  steps (the test oracle);
* ``triton``: opt-in, Triton kernels that keep the state in registers
  (:mod:`selective_scan_triton`), for GPUs without mamba-ssm; float32 inside. Checked against
  the oracle through Triton's CPU interpreter (``TRITON_INTERPRET=1``), not yet timed on a GPU,
  so ``auto`` does not pick it.

``auto`` (the default) picks ``cuda`` when possible and ``torch`` otherwise. The environment
variable ``MAMBA_ASR_SCAN_IMPL`` (``auto``/``cuda``/``torch``/``ref``/``triton``) or the
``impl=`` argument forces a path; the same setting selects the causal convolution
(``causal_conv1d``'s CUDA kernel, ``F.conv1d`` (also for ``triton``), or a sequential
reference). Which path runs is logged once.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from modules.mamba.selective_scan_chunked import selective_scan_chunked
from modules.mamba.selective_scan_ref import (
    causal_conv1d_ref,
    check_conv_args,
    finish_output,
    prepare_inputs,
    selective_scan_ref,
)

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
    "selective_scan_triton",
]

logger = logging.getLogger(__name__)

ENV_VAR = "MAMBA_ASR_SCAN_IMPL"
IMPLS = ("auto", "cuda", "torch", "ref", "triton")
SCAN_PATHS = {
    "cuda": "mamba-ssm CUDA kernel",
    "torch": "PyTorch chunked parallel scan",
    "ref": "PyTorch sequential reference",
    "triton": "Triton selective-scan kernels",
}
CONV_PATHS = {
    "cuda": "causal-conv1d CUDA kernel",
    "torch": "PyTorch conv1d",
    "ref": "PyTorch sequential reference",
}
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
def _load_triton_scan() -> tuple[Callable[..., Any] | None, str]:
    """Our Triton ``selective_scan_core`` and "ok", or None and why it is unavailable."""
    try:
        from modules.mamba.selective_scan_triton import selective_scan_core as fn
    except Exception as exc:  # ImportError (no triton, e.g. on macOS), or a broken install
        return None, f"{type(exc).__name__}: {exc}"
    return fn, "ok"


def _triton_interpreted() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
    if choice == "triton":
        if kind == "conv":
            return "torch"
        fn, reason = _load_triton_scan()
        if fn is None:
            raise RuntimeError(f"{ENV_VAR}/impl='triton' needs triton, which does not import "
                               f"({reason}). Use impl 'auto' or 'torch'.")
        if device_type != "cuda" and not _triton_interpreted():
            raise RuntimeError(
                f"{ENV_VAR}/impl='triton' compiles GPU kernels, which need CUDA tensors; got "
                f"tensors on {device_type} (TRITON_INTERPRET=1 runs them on CPU, slowly). "
                f"Use impl 'auto' or 'torch'."
            )
        return choice
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
    """Selective-scan path for tensors on ``device``: "cuda", "torch", "ref" or "triton"."""
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


# --------------------------------------------------------------------------- selective scan


def selective_scan_triton(
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
    """(b, d, L) -> y (b, d, L) [, last_state (b, d, N)] through the Triton kernels.

    Arguments as :func:`selective_scan_fn`; computes in float32 (also for float64 inputs).
    """
    core, reason = _load_triton_scan()
    if core is None:
        raise RuntimeError(f"the Triton scan needs triton, which does not import ({reason})")
    dtype_in = u.dtype
    u_c, delta_c, A_c, B_c, C_c = prepare_inputs(u, delta, A, B, C, delta_bias, delta_softplus)
    y, last = core(u_c, delta_c, A_c, B_c, C_c)
    out = finish_output(y.to(u_c.dtype), u_c, D, z, dtype_in)
    return (out, last) if return_last_state else out


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
    if path == "triton":
        return selective_scan_triton(*args)
    return selective_scan_chunked(*args)


# --------------------------------------------------------------------------- causal conv


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
    check_conv_args(x, weight, bias, activation)
    path = resolve_conv_impl(x.device, impl)
    _announce("conv", path, x.device)
    if path == "cuda":
        return _load_causal_conv1d()[0](x, weight, bias, activation=activation)
    if path == "ref":
        return causal_conv1d_ref(x, weight, bias, activation)
    k = weight.shape[1]
    out = F.conv1d(F.pad(x, (k - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out) if activation is not None else out
