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

Five implementations, chosen in one place (:func:`resolve_scan_impl`):

* ``cuda``: mamba-ssm's fused CUDA kernel, used when ``mamba_ssm`` imports and the tensors
  are on a CUDA device;
* ``torch``: :func:`selective_scan_chunked` (:mod:`selective_scan_chunked`), a pure-PyTorch
  chunked parallel scan that runs on CPU, Apple MPS and CUDA;
* ``ref``: :func:`selective_scan_ref` (:mod:`selective_scan_ref`), a plain loop over time
  steps (the test oracle);
* ``triton``: opt-in, Triton kernels that keep the state in registers
  (:mod:`selective_scan_triton`), for GPUs without mamba-ssm; float32 inside. Checked against
  the oracle through Triton's CPU interpreter (``TRITON_INTERPRET=1``), not yet timed on a GPU,
  so ``auto`` does not pick it;
* ``export``: :func:`selective_scan_export` (:mod:`selective_scan_export`), the recurrence
  through torch's ``scan`` operator, which ``torch.export`` and the ONNX exporter handle for
  any batch and length (slow in eager mode).

``auto`` (the default) picks ``export`` while ``torch.export`` traces the model
(``torch.compiler.is_exporting()``), else ``cuda`` when possible and ``torch`` otherwise. The
environment variable ``MAMBA_ASR_SCAN_IMPL`` (``auto``/``cuda``/``torch``/``ref``/``triton``/
``export``) or the
``impl=`` argument forces a path; the same setting selects the causal convolution
(``causal_conv1d``'s CUDA kernel, ``F.conv1d`` (also for ``triton``), or a sequential
reference). Which path runs is logged once (INFO). A kernel package that is installed but
fails to import (built for another torch, a missing symbol) would make ``auto`` run PyTorch on
CUDA without a word, so that fallback is logged once at WARNING with the import error and the
fix; a package that is not installed at all is the expected CPU/MPS setup and stays silent.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from modules.mamba.selective_scan_chunked import selective_scan_chunked
from modules.mamba.selective_scan_export import selective_scan_export
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
    "fallback_warning",
    "kernel_status",
    "resolve_conv_impl",
    "resolve_scan_impl",
    "selective_scan_chunked",
    "selective_scan_export",
    "selective_scan_fn",
    "selective_scan_ref",
    "selective_scan_triton",
]

logger = logging.getLogger(__name__)

ENV_VAR = "MAMBA_ASR_SCAN_IMPL"
IMPLS = ("auto", "cuda", "torch", "ref", "triton", "export")
SCAN_PATHS = {
    "cuda": "mamba-ssm CUDA kernel",
    "torch": "PyTorch chunked parallel scan",
    "ref": "PyTorch sequential reference",
    "triton": "Triton selective-scan kernels",
    "export": "PyTorch scan operator (exportable)",
}
CONV_PATHS = {
    "cuda": "causal-conv1d CUDA kernel",
    "torch": "PyTorch conv1d",
    "ref": "PyTorch sequential reference",
}
_PATH_NAMES = {"scan": SCAN_PATHS, "conv": CONV_PATHS}
PACKAGES = {"scan": "mamba-ssm", "conv": "causal-conv1d"}  # the CUDA kernels of each kind
NOT_INSTALLED = "not installed"
_announced: set[tuple[str, str]] = set()  # (kind, path or "fallback") already logged

Tensor = torch.Tensor


# --------------------------------------------------------------------------- dispatch


class KernelImport(NamedTuple):
    """A kernel package's entry point, or None and why it is unavailable."""

    fn: Callable[..., Any] | None
    reason: str  # "ok", NOT_INSTALLED, or the import's exception as "Type: message"

    @property
    def broken(self) -> bool:
        """Installed, but importing it raises (e.g. a build for another torch)."""
        return self.fn is None and self.reason != NOT_INSTALLED


def _import_kernel(package: str, module: str, name: str) -> KernelImport:
    """``module.name`` if it imports; "not installed" when ``package`` is not found at all.

    Any exception of an installed package's import is caught: an ImportError, or an
    OSError/RuntimeError from a build against another torch or CUDA (a missing symbol).
    """
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken parent, or a module without a spec
        found = True
    if not found:
        return KernelImport(None, NOT_INSTALLED)
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as exc:
        return KernelImport(None, f"{type(exc).__name__}: {exc}")
    return KernelImport(fn, "ok")


@functools.cache
def _load_mamba_ssm() -> KernelImport:
    """mamba-ssm's CUDA ``selective_scan_fn``."""
    return _import_kernel("mamba_ssm", "mamba_ssm.ops.selective_scan_interface",
                          "selective_scan_fn")


@functools.cache
def _load_causal_conv1d() -> KernelImport:
    """causal-conv1d's CUDA ``causal_conv1d_fn``."""
    return _import_kernel("causal_conv1d", "causal_conv1d", "causal_conv1d_fn")


@functools.cache
def _load_triton_scan() -> KernelImport:
    """Our Triton ``selective_scan_core`` (needs triton, which macOS lacks)."""
    return _import_kernel("triton", "modules.mamba.selective_scan_triton", "selective_scan_core")


def _load_kernel(kind: str) -> KernelImport:
    """The CUDA kernel of ``kind``: "scan" (mamba-ssm) or "conv" (causal-conv1d)."""
    return _load_mamba_ssm() if kind == "scan" else _load_causal_conv1d()


def _triton_interpreted() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def requested_impl(impl: str | None = None) -> str:
    """The requested implementation: ``impl`` if given, else ``$MAMBA_ASR_SCAN_IMPL``, else auto."""
    value = impl if impl is not None else os.environ.get(ENV_VAR, "auto")
    value = value.strip().lower() or "auto"
    if value not in IMPLS:
        source = "impl argument" if impl is not None else ENV_VAR
        raise ValueError(f"{source}={value!r}: expected one of {', '.join(IMPLS)}")
    return value


def _resolve(kind: str, device: torch.device | str, impl: str | None) -> str:
    """Shared logic of :func:`resolve_scan_impl` and :func:`resolve_conv_impl`."""
    choice = requested_impl(impl)
    device_type = torch.device(device).type
    if choice == "auto" and torch.compiler.is_exporting():
        choice = "export"
    if choice == "export":
        return "torch" if kind == "conv" else choice
    if choice == "auto":
        return "cuda" if device_type == "cuda" and _load_kernel(kind).fn is not None else "torch"
    if choice == "triton":
        if kind == "conv":
            return "torch"
        fn, reason = _load_triton_scan()
        if fn is None:
            raise RuntimeError(f"{ENV_VAR}/impl='triton' needs triton, which is unavailable "
                               f"({reason}). Use impl 'auto' or 'torch'.")
        if device_type != "cuda" and not _triton_interpreted():
            raise RuntimeError(
                f"{ENV_VAR}/impl='triton' compiles GPU kernels, which need CUDA tensors; got "
                f"tensors on {device_type} (TRITON_INTERPRET=1 runs them on CPU, slowly). "
                f"Use impl 'auto' or 'torch'."
            )
        return choice
    if choice == "cuda":
        package = PACKAGES[kind]
        fn, reason = _load_kernel(kind)
        if fn is None:
            raise RuntimeError(
                f"{ENV_VAR}/impl='cuda' needs the {package} CUDA kernels, which are unavailable "
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
    """Selective-scan path for tensors on ``device``: "cuda", "torch", "ref", "triton" or
    "export"."""
    return _resolve("scan", device, impl)


def resolve_conv_impl(device: torch.device | str, impl: str | None = None) -> str:
    """Causal-convolution path for tensors on ``device``: "cuda", "torch" or "ref"."""
    return _resolve("conv", device, impl)


def fallback_warning(kind: str, device: torch.device | str, impl: str | None = None) -> str:
    """Why ``auto`` runs PyTorch instead of an installed CUDA kernel for ``kind`` on ``device``.

    ``kind`` is "scan" (mamba-ssm) or "conv" (causal-conv1d). Non-empty only where the kernels
    would run (CUDA tensors, ``auto``) and their package is installed but fails to import;
    empty when they import, are not installed, the tensors are elsewhere or a path is forced.
    """
    if torch.device(device).type != "cuda" or requested_impl(impl) != "auto":
        return ""
    loaded = _load_kernel(kind)
    if not loaded.broken:
        return ""
    instead = _PATH_NAMES[kind]["torch"]
    if kind == "scan":
        instead += ", 11-15x slower (the scan alone, measured on an H100)"
    return (f"{PACKAGES[kind]} is installed but fails to import ({loaded.reason}), so CUDA "
            f"tensors run the {instead}. Reinstall it against this torch "
            f"({torch.__version__}): pip install -r requirements-cuda.txt --no-build-isolation; "
            f"or set {ENV_VAR}=torch to use PyTorch without this warning.")


def _dispatch(kind: str, device: torch.device | str, impl: str | None) -> str:
    """The path of a call on ``device`` (see :func:`resolve_scan_impl`), logged once per
    process: which path runs (INFO), and why ``auto`` falls back from a broken CUDA kernel
    install (WARNING, :func:`fallback_warning`)."""
    device = torch.device(device)
    path = _resolve(kind, device, impl)
    if (kind, path) not in _announced:
        _announced.add((kind, path))
        logger.info("%s: using the %s (device %s)", kind, _PATH_NAMES[kind][path], device.type)
    if path == "torch" and (kind, "fallback") not in _announced:
        warning = fallback_warning(kind, device, impl)
        if warning:
            _announced.add((kind, "fallback"))
            logger.warning("%s", warning)
    return path


def kernel_status(device: torch.device | str | None = None) -> dict[str, str]:
    """Which selective-scan and causal-conv paths run on ``device`` (default: cuda if present).

    Returns ``{"requested", "scan", "conv", "scan_warning", "conv_warning", "mamba_ssm",
    "causal_conv1d"}`` as readable strings: a package is "ok", "not installed" or
    "installed, but its import fails (...)"; a forced path that cannot run is reported as
    ``"error: ..."`` instead of raising; a warning is :func:`fallback_warning`'s, or empty.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    status = {"scan_warning": "", "conv_warning": ""}
    for kind, key in (("scan", "mamba_ssm"), ("conv", "causal_conv1d")):
        loaded = _load_kernel(kind)
        broken = f"installed, but its import fails ({loaded.reason})"
        status[key] = broken if loaded.broken else loaded.reason
    try:
        status["requested"] = requested_impl()
    except ValueError as exc:
        status["requested"] = f"error: {exc}"
        status["scan"] = status["conv"] = f"error: {exc}"
        return status
    for kind, names in _PATH_NAMES.items():
        try:
            status[kind] = names[_resolve(kind, device, None)]
        except RuntimeError as exc:
            status[kind] = f"error: {exc}"
        status[f"{kind}_warning"] = fallback_warning(kind, device)
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
    ("auto", "cuda", "torch", "ref", "triton", "export") overrides ``$MAMBA_ASR_SCAN_IMPL``;
    see the module doc.
    """
    path = _dispatch("scan", u.device, impl)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if path == "cuda":
        return _load_mamba_ssm()[0](*args)
    if path == "ref":
        return selective_scan_ref(*args)
    if path == "triton":
        return selective_scan_triton(*args)
    if path == "export":
        return selective_scan_export(*args)
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
    path = _dispatch("conv", x.device, impl)
    if path == "cuda":
        return _load_causal_conv1d()[0](x, weight, bias, activation=activation)
    if path == "ref":
        return causal_conv1d_ref(x, weight, bias, activation)
    k = weight.shape[1]
    out = F.conv1d(F.pad(x, (k - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out) if activation is not None else out
