"""The pure-PyTorch selective scan against its sequential oracle; kernel dispatch; causal conv."""

from __future__ import annotations

import functools
import logging
import math
import random

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from modules.mamba import selective_scan_chunked as chunked
from modules.mamba import selective_scan_interface as ssi
from modules.mamba.bimamba import Mamba
from modules.mamba.selective_scan_chunked import selective_scan_chunked
from modules.mamba.selective_scan_export import selective_scan_export
from modules.mamba.selective_scan_interface import (
    causal_conv1d_fn,
    kernel_status,
    resolve_conv_impl,
    resolve_scan_impl,
    selective_scan_fn,
)
from modules.mamba.selective_scan_ref import causal_conv1d_ref, selective_scan_ref


def make_inputs(
    batch: int = 2,
    dim: int = 4,
    nstate: int = 3,
    length: int = 7,
    groups: int | None = 1,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    with_d: bool = True,
    with_z: bool = True,
    with_bias: bool = True,
    a_min: float = -3.0,
    device: str = "cpu",
) -> dict[str, torch.Tensor | None]:
    """Random scan inputs; ``groups=None`` gives 3-D B and C (batch, N, L)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(
            device=device, dtype=dtype)

    bc_shape = (batch, nstate, length) if groups is None else (batch, groups, nstate, length)
    return {
        "u": rand(batch, dim, length),
        "delta": rand(batch, dim, length, lo=-1.0, hi=1.0 if with_bias else 1.5).abs(),
        "A": rand(dim, nstate, lo=a_min, hi=-0.05),
        "B": rand(*bc_shape),
        "C": rand(*bc_shape),
        "D": rand(dim) if with_d else None,
        "z": rand(batch, dim, length) if with_z else None,
        "delta_bias": rand(dim, lo=-0.5, hi=0.5) if with_bias else None,
    }


def as64(inputs: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """The same inputs in float64 on the CPU."""
    return {k: None if v is None else v.detach().cpu().double() for k, v in inputs.items()}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref|."""
    y, ref = y.detach().cpu().double(), ref.detach().cpu().double()
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def random_cases(n: int, seed: int) -> list[dict]:
    """Random shapes: batch 1-3, dim 1-8, N 1-16, L from 1 to many chunks, all options."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        dim = rng.randint(1, 8)
        groups = rng.choice([None, 1] + [g for g in (2, 4, 8) if dim % g == 0])
        cases.append({
            "batch": rng.randint(1, 3),
            "dim": dim,
            "nstate": rng.randint(1, 16),
            "length": [1, 2, 5, 8, 13, 37, 64, 100][i % 8],
            "groups": groups,
            "chunk_size": rng.choice([None, 1, 3, 4, 8, 16]),
            "with_d": rng.random() < 0.7,
            "with_z": rng.random() < 0.6,
            "with_bias": rng.random() < 0.6,
            "softplus": rng.random() < 0.6,
            "last": rng.random() < 0.5,
            "seed": i,
        })
    return cases


CASES = random_cases(24, seed=1234)


def run_case(case: dict, dtype: torch.dtype) -> tuple[object, object]:
    """(ours, float64 reference) for one random case."""
    inputs = make_inputs(case["batch"], case["dim"], case["nstate"], case["length"],
                         case["groups"], dtype, case["seed"], case["with_d"], case["with_z"],
                         case["with_bias"])
    kw = {"delta_softplus": case["softplus"], "return_last_state": case["last"]}
    ours = selective_scan_chunked(**inputs, **kw, chunk_size=case["chunk_size"])
    ref = selective_scan_ref(**as64(inputs), **kw)
    return ours, ref


def textbook_scan(u, delta, A, B, C, D, z, delta_bias, softplus):
    """mamba-ssm's definition written out element by element with Python floats."""
    batch, dim, length = u.shape
    nstate = A.shape[1]
    groups = 1 if B.dim() == 3 else B.shape[1]
    y = torch.zeros(batch, dim, length, dtype=torch.float64)
    last = torch.zeros(batch, dim, nstate, dtype=torch.float64)
    for b in range(batch):
        for d in range(dim):
            g = d // (dim // groups)
            bb = B[b] if B.dim() == 3 else B[b, g]
            cc = C[b] if C.dim() == 3 else C[b, g]
            h = [0.0] * nstate
            for t in range(length):
                dt = float(delta[b, d, t]) + (float(delta_bias[d]) if delta_bias is not None
                                              else 0.0)
                if softplus:
                    dt = math.log1p(math.exp(dt)) if dt <= 20 else dt
                acc = 0.0
                for n in range(nstate):
                    h[n] = math.exp(dt * float(A[d, n])) * h[n] + dt * float(bb[n, t]) * float(
                        u[b, d, t])
                    acc += h[n] * float(cc[n, t])
                if D is not None:
                    acc += float(D[d]) * float(u[b, d, t])
                if z is not None:
                    zz = float(z[b, d, t])
                    acc *= zz / (1.0 + math.exp(-zz))
                y[b, d, t] = acc
            last[b, d] = torch.tensor(h, dtype=torch.float64)
    return y, last


@pytest.mark.parametrize("groups", [None, 1, 2])
def test_reference_matches_textbook_definition(groups):
    inputs = make_inputs(2, 4, 3, 9, groups, seed=21)
    expect, expect_last = textbook_scan(**inputs, softplus=True)
    for fn in (selective_scan_ref, selective_scan_chunked):
        y, last = fn(**inputs, delta_softplus=True, return_last_state=True)
        assert rel_err(y, expect) <= 1e-12 and rel_err(last, expect_last) <= 1e-12


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{batch}d{dim}n{nstate}L{length}".format(
    **c))
def test_matches_reference_float64(case):
    ours, ref = run_case(case, torch.float64)
    if case["last"]:
        (ours, ours_last), (ref, ref_last) = ours, ref
        assert ours_last.shape == (case["batch"], case["dim"], case["nstate"])
        assert ours_last.dtype == torch.float64
        assert rel_err(ours_last, ref_last) <= 1e-10
    assert ours.shape == ref.shape == (case["batch"], case["dim"], case["length"])
    assert ours.dtype == torch.float64
    assert rel_err(ours, ref) <= 1e-10


@pytest.mark.parametrize("case", CASES[::2], ids=lambda c: "b{batch}d{dim}n{nstate}L{length}"
                         .format(**c))
def test_matches_reference_float32(case):
    ours, ref = run_case(case, torch.float32)
    if case["last"]:
        (ours, ours_last), (ref, ref_last) = ours, ref
        assert ours_last.dtype == torch.float32
        assert rel_err(ours_last, ref_last) <= 1e-4
    assert ours.dtype == torch.float32
    assert rel_err(ours, ref) <= 1e-4


def test_float32_reference_agrees_too():
    inputs = make_inputs(3, 8, 16, 300, 2, torch.float32, seed=5)
    ours = selective_scan_fn(**inputs, delta_softplus=True, impl="torch")
    ref32 = selective_scan_ref(**inputs, delta_softplus=True)
    assert ref32.dtype == torch.float32
    assert rel_err(ours, ref32) <= 1e-4


def test_default_chunking_many_chunks():
    # Large enough rows for the automatic chunk length to split L = 300 into several chunks.
    inputs = make_inputs(2, 256, 16, 300, 4, torch.float64, seed=9)
    assert chunked._chunk_size(2 * 256 * 16, 300, torch.device("cpu")) < 300
    ours = selective_scan_fn(**inputs, delta_softplus=True)
    ref = selective_scan_ref(**inputs, delta_softplus=True)
    assert rel_err(ours, ref) <= 1e-10


@pytest.mark.parametrize("tile", [1, 2])
def test_batch_tiles_and_blocks(monkeypatch, tile):
    # On CPU the batch is scanned in tiles of a few elements, and time in blocks of chunks;
    # neither may change the result. Tiles of 1 and of 2 (5 = 2 + 2 + 1), L = 150: blocks
    # of 64 steps and a last chunk of 6.
    batch, dim, nstate, length = 5, 6, 4, 150
    inputs = make_inputs(batch, dim, nstate, length, 3, seed=12)
    per_thread = -(-tile * 8 * dim * nstate * 8 // torch.get_num_threads())  # T 8, float64
    monkeypatch.setattr(chunked, "_CPU_TILE_BYTES", per_thread)
    assert chunked._batch_tile(batch, dim * nstate, 8, inputs["u"]) == tile
    kw = {"delta_softplus": True, "return_last_state": True}
    results = {}
    for name, fn in (("ours", selective_scan_chunked), ("ref", selective_scan_ref)):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y, last = fn(**leaves, **kw)
        g = torch.Generator().manual_seed(1)
        torch.autograd.backward([y, last], [torch.randn(y.shape, generator=g,
                                                        dtype=y.dtype),
                                            torch.randn(last.shape, generator=g,
                                                        dtype=last.dtype)])
        results[name] = (y, last, {k: v.grad for k, v in leaves.items()})
    (y, last, grads), (y_ref, last_ref, grads_ref) = results["ours"], results["ref"]
    assert rel_err(y, y_ref) <= 1e-10 and rel_err(last, last_ref) <= 1e-10
    for k in inputs:
        assert rel_err(grads[k], grads_ref[k]) <= 1e-10, k
    with torch.no_grad():
        assert rel_err(selective_scan_chunked(**inputs, **kw)[0], y_ref) <= 1e-10


@pytest.mark.parametrize("n", list(range(1, 34)))
def test_blelloch_scan_rows(n):
    g = torch.Generator().manual_seed(n)
    a = torch.rand(n, 3, generator=g, dtype=torch.float64)
    b = torch.randn(n, 3, generator=g, dtype=torch.float64)
    for reverse in (False, True):
        expect = b.clone()
        order = range(n - 2, -1, -1) if reverse else range(1, n)
        for i in order:
            expect[i] += a[i] * expect[i + 1 if reverse else i - 1]
        got, work = b.clone(), torch.full_like(a, float("nan"))
        a_in = a.clone()
        chunked._scan_(a_in, got, reverse=reverse, work=work)
        assert torch.equal(a_in, a)  # with a work buffer the decays are left alone
        assert torch.allclose(got, expect, rtol=1e-13, atol=1e-13)
        got = b.clone()
        chunked._scan_(a.clone(), got, reverse=reverse)
        assert torch.allclose(got, expect, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("block", [0, 1, 2, 3, 8])
def test_blelloch_scan_blocks(block):
    # _scan_ in blocks of any size (0: one block, as on GPUs) equals the sequential recurrence.
    for n in (1, 2, 3, 5, 8, 13, 16, 33):
        g = torch.Generator().manual_seed(n)
        a = torch.rand(n, 3, generator=g, dtype=torch.float64)
        b = torch.randn(n, 3, generator=g, dtype=torch.float64)
        for reverse in (False, True):
            expect = b.clone()
            order = range(n - 2, -1, -1) if reverse else range(1, n)
            for i in order:
                expect[i] += a[i] * expect[i + 1 if reverse else i - 1]
            got, work, a_in = b.clone(), torch.full_like(a, float("nan")), a.clone()
            chunked._scan_(a_in, got, reverse=reverse, work=work, block=block)
            assert torch.equal(a_in, a)
            assert torch.allclose(got, expect, rtol=1e-13, atol=1e-13)
            got = b.clone()
            chunked._scan_(a.clone(), got, reverse=reverse, block=block)
            assert torch.allclose(got, expect, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("scan_block", [0, 2])
def test_scan_blocks_in_chunks(monkeypatch, scan_block):
    # Chunks scanned as one Blelloch block (what GPUs run) or in blocks of 2 match the oracle.
    monkeypatch.setattr(chunked, "_SCAN_BLOCK", scan_block)
    inputs = make_inputs(2, 4, 3, 70, 2, seed=13)
    kw = {"delta_softplus": True, "return_last_state": True}
    grads = {}
    for name, fn, extra in (("ours", selective_scan_chunked, {"chunk_size": 32}),
                            ("ref", selective_scan_ref, {})):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y, last = fn(**leaves, **kw, **extra)
        (y.square().sum() + last.sum()).backward()
        grads[name] = (y, last, {k: v.grad for k, v in leaves.items()})
    (y, last, g), (y_ref, last_ref, g_ref) = grads["ours"], grads["ref"]
    assert rel_err(y, y_ref) <= 1e-10 and rel_err(last, last_ref) <= 1e-10
    for k in inputs:
        assert rel_err(g[k], g_ref[k]) <= 1e-10, k


# --------------------------------------------------------------------------- gradients


GRAD_CASES = [
    # batch, dim, N, L, groups, chunk, softplus, D, z, bias, last
    (2, 4, 3, 7, 2, 3, True, True, True, True, True),
    (1, 2, 2, 9, None, 4, False, False, False, False, False),
    (2, 2, 3, 5, 1, 8, True, True, False, True, True),
    (1, 4, 2, 6, 4, 1, False, True, True, False, True),
]


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradcheck(case):
    batch, dim, nstate, length, groups, chunk, softplus, with_d, with_z, with_bias, last = case
    inputs = make_inputs(batch, dim, nstate, length, groups, seed=length, with_d=with_d,
                         with_z=with_z, with_bias=with_bias)
    names = [k for k, v in inputs.items() if v is not None]
    tensors = [inputs[k].requires_grad_() for k in names]

    def fn(*args: torch.Tensor) -> object:
        kw = dict(zip(names, args, strict=True))
        return selective_scan_chunked(**kw, delta_softplus=softplus, return_last_state=last,
                                      chunk_size=chunk)

    assert torch.autograd.gradcheck(fn, tensors)


def test_gradcheck_last_state_only():
    inputs = make_inputs(2, 4, 3, 10, 2, with_z=False)
    names = ["u", "delta", "A", "B", "C"]
    tensors = [inputs[k].requires_grad_() for k in names]

    def fn(*args: torch.Tensor) -> torch.Tensor:
        return selective_scan_chunked(*args, return_last_state=True, chunk_size=4)[1]

    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_gradients_match_reference(dtype, tol):
    inputs = make_inputs(2, 8, 16, 150, 2, dtype, seed=3)
    kw = {"delta_softplus": True, "return_last_state": True}
    grads = {}
    for name, fn in (("ours", selective_scan_chunked), ("ref", selective_scan_ref)):
        cast = torch.float64 if name == "ref" else dtype
        leaves = {k: v.to(cast).clone().requires_grad_() for k, v in inputs.items()}
        y, last = fn(**leaves, **kw)
        g = torch.Generator().manual_seed(0)
        gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
        glast = torch.randn(last.shape, generator=g, dtype=torch.float64).to(last.dtype)
        torch.autograd.backward([y, last], [gy, glast])
        grads[name] = {k: v.grad for k, v in leaves.items()}
    for k in inputs:
        assert grads["ours"][k].dtype == dtype
        assert rel_err(grads["ours"][k], grads["ref"][k]) <= tol, k


def test_no_grad_forward_equals_grad_forward():
    inputs = make_inputs(2, 4, 5, 40, 2, seed=4)
    with torch.no_grad():
        y0 = selective_scan_chunked(**inputs, chunk_size=8)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y1 = selective_scan_chunked(**leaves, chunk_size=8)
    assert torch.equal(y0, y1.detach())


# --------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_long_sequence_with_stiff_decays_is_finite_and_exact(dtype, tol):
    inputs = make_inputs(1, 3, 4, 16000, None, dtype, seed=7, a_min=-16.0)
    inputs["delta_bias"] = torch.full((3,), 5.0, dtype=dtype)
    inputs["delta"] = inputs["delta"] * 4
    inputs["A"][0, 0] = -16.0
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, last = selective_scan_chunked(**leaves, delta_softplus=True, return_last_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(last).all()
    (y.sum() + last.sum()).backward()
    for k, v in leaves.items():
        assert torch.isfinite(v.grad).all(), k
    with torch.no_grad():
        ref = selective_scan_ref(**as64(inputs), delta_softplus=True)
    assert rel_err(y, ref) <= tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    inputs = make_inputs(2, 8, 16, 70, 2, dtype, seed=8)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, last = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True,
                                impl="torch")
    assert y.dtype == dtype and last.dtype == torch.float32
    ref = selective_scan_ref(**as64(inputs), delta_softplus=True)
    assert rel_err(y, ref) <= (1e-2 if dtype == torch.float16 else 2e-2)
    y.float().sum().backward()
    for k, v in leaves.items():
        assert v.grad is not None and v.grad.dtype == dtype and torch.isfinite(v.grad).all(), k


def test_empty_sequence():
    inputs = make_inputs(2, 4, 3, 0, 1)
    y, last = selective_scan_chunked(**inputs, return_last_state=True)
    assert y.shape == (2, 4, 0) and last.shape == (2, 4, 3) and not last.any()


def test_empty_batch_forward_and_backward():
    inputs = make_inputs(0, 4, 3, 10, 2)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, last = selective_scan_chunked(**leaves, return_last_state=True)
    assert y.shape == (0, 4, 10) and last.shape == (0, 4, 3)
    (y.sum() + last.sum()).backward()
    assert leaves["u"].grad.shape == (0, 4, 10) and not leaves["A"].grad.any()


def test_non_contiguous_inputs():
    inputs = make_inputs(2, 6, 4, 30, 3, seed=11)
    # (batch, L, dim) storage seen as (batch, dim, L), as a transposed projection output gives
    views = {k: v.transpose(-1, -2).contiguous().transpose(-1, -2) if k in ("u", "delta", "z")
             else v for k, v in inputs.items()}
    assert not views["u"].is_contiguous()
    assert rel_err(selective_scan_chunked(**views, chunk_size=8),
                   selective_scan_ref(**inputs)) <= 1e-10


@pytest.mark.parametrize("bad", ["A", "B", "C", "groups"])
def test_shape_errors(bad):
    inputs = make_inputs(2, 4, 3, 7, 2)
    if bad == "A":
        inputs["A"] = inputs["A"][:3]
    elif bad == "B":
        inputs["B"] = inputs["B"][..., :5]
    elif bad == "C":
        inputs["C"] = inputs["C"][:, 0]  # 3-D while B has 2 groups
    else:
        inputs["B"] = torch.zeros(2, 3, 3, 7, dtype=torch.float64)
        inputs["C"] = torch.zeros(2, 3, 3, 7, dtype=torch.float64)
    with pytest.raises(ValueError):
        selective_scan_chunked(**inputs)


# --------------------------------------------------------------------------- dispatch


@pytest.fixture
def no_env(monkeypatch):
    """Dispatch as on a machine without the override variable and without mamba-ssm."""
    monkeypatch.delenv(ssi.ENV_VAR, raising=False)
    not_installed = ssi.KernelImport(None, ssi.NOT_INSTALLED)
    monkeypatch.setattr(ssi, "_load_mamba_ssm", lambda: not_installed)
    monkeypatch.setattr(ssi, "_load_causal_conv1d", lambda: not_installed)
    monkeypatch.setattr(ssi, "_announced", set())
    return monkeypatch


UNDEFINED_SYMBOL = ("selective_scan_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: "
                    "_ZN3c104cuda9SetDeviceEi")
NO_CUDART = "libcudart.so.12: cannot open shared object file: No such file or directory"


def broken_kernel_packages(monkeypatch: pytest.MonkeyPatch, folder) -> None:
    """Install stand-ins for mamba-ssm and causal-conv1d builds that no longer load (built for
    another torch or CUDA): packages on ``sys.path`` whose import raises. The loaders' caches
    are replaced by fresh ones for the test, and the dispatch forgets what it has logged."""
    for package, error in (("mamba_ssm", f"ImportError({UNDEFINED_SYMBOL!r})"),
                           ("causal_conv1d", f"OSError({NO_CUDART!r})")):
        (folder / package).mkdir()
        (folder / package / "__init__.py").write_text(f"raise {error}\n")
    monkeypatch.syspath_prepend(str(folder))
    for name in ("_load_mamba_ssm", "_load_causal_conv1d"):
        monkeypatch.setattr(ssi, name, functools.cache(getattr(ssi, name).__wrapped__))
    monkeypatch.delenv(ssi.ENV_VAR, raising=False)
    monkeypatch.setattr(ssi, "_announced", set())


def test_interface_keeps_the_upstream_names():
    # Code written against mamba-ssm / causal-conv1d imports these names from the interface;
    # the implementations live in their own modules.
    assert ssi.selective_scan_ref is selective_scan_ref
    assert ssi.causal_conv1d_ref is causal_conv1d_ref
    assert ssi.selective_scan_chunked is selective_scan_chunked
    for name in ssi.__all__:
        assert getattr(ssi, name) is not None, name
    assert {"selective_scan_fn", "selective_scan_ref", "causal_conv1d_fn",
            "causal_conv1d_ref"} <= set(ssi.__all__)


def test_auto_falls_back_to_torch_without_mamba_ssm(no_env):
    for device in ("cpu", "cuda", "mps"):
        assert resolve_scan_impl(device) == "torch"
        assert resolve_conv_impl(device) == "torch"
    status = kernel_status("cuda")
    assert status["scan"] == ssi.SCAN_PATHS["torch"]
    assert status["conv"] == ssi.CONV_PATHS["torch"]
    assert status["mamba_ssm"] == ssi.NOT_INSTALLED and status["requested"] == "auto"
    assert status["scan_warning"] == status["conv_warning"] == ""


def test_auto_uses_cuda_kernels_only_for_cuda_tensors(no_env):
    no_env.setattr(ssi, "_load_mamba_ssm", lambda: ssi.KernelImport(object(), "ok"))
    no_env.setattr(ssi, "_load_causal_conv1d", lambda: ssi.KernelImport(object(), "ok"))
    assert resolve_scan_impl("cuda") == "cuda" and resolve_conv_impl("cuda") == "cuda"
    assert resolve_scan_impl("cpu") == "torch" and resolve_conv_impl("mps") == "torch"
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        resolve_scan_impl("cpu", impl="cuda")
    assert kernel_status("cuda")["scan"] == ssi.SCAN_PATHS["cuda"]


def test_forcing_cuda_without_mamba_ssm_is_a_clear_error(no_env):
    inputs = make_inputs()
    with pytest.raises(RuntimeError, match="mamba-ssm"):
        selective_scan_fn(**inputs, impl="cuda")
    no_env.setenv(ssi.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="mamba-ssm"):
        selective_scan_fn(**inputs)
    with pytest.raises(RuntimeError, match="causal-conv1d"):
        causal_conv1d_fn(torch.zeros(1, 2, 5), torch.zeros(2, 4))
    status = kernel_status("cpu")
    assert status["scan"].startswith("error:") and "mamba-ssm" in status["scan"]


def test_env_var_and_argument_choose_the_path(no_env):
    inputs = make_inputs(length=20)
    ref = selective_scan_ref(**inputs)
    ours = selective_scan_chunked(**inputs)
    no_env.setenv(ssi.ENV_VAR, "ref")
    assert resolve_scan_impl("cpu") == "ref"
    assert torch.equal(selective_scan_fn(**inputs), ref)
    assert torch.equal(selective_scan_fn(**inputs, impl="torch"), ours)  # argument wins
    assert kernel_status("cpu")["scan"] == ssi.SCAN_PATHS["ref"]
    no_env.setenv(ssi.ENV_VAR, " Torch ")
    assert torch.equal(selective_scan_fn(**inputs), ours)
    no_env.setenv(ssi.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=ssi.ENV_VAR):
        selective_scan_fn(**inputs)
    assert kernel_status("cpu")["scan"].startswith("error:")
    with pytest.raises(ValueError, match="impl"):
        selective_scan_fn(**inputs, impl="jax")


def test_path_is_logged_once(no_env, caplog):
    inputs = make_inputs()
    with caplog.at_level(logging.INFO, logger=ssi.__name__):
        for _ in range(3):
            selective_scan_fn(**inputs)
            causal_conv1d_fn(inputs["u"], torch.ones(4, 3, dtype=torch.float64))
        # Kernels that are not installed are the expected CPU/MPS setup: no warning on CUDA.
        assert ssi._dispatch("scan", "cuda", None) == "torch"
        assert ssi._dispatch("conv", "cuda", None) == "torch"
    messages = [r.getMessage() for r in caplog.records]
    assert sum(ssi.SCAN_PATHS["torch"] in m for m in messages) == 1
    assert sum(ssi.CONV_PATHS["torch"] in m for m in messages) == 1
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("case", CASES[::3], ids=lambda c: "b{batch}d{dim}n{nstate}L{length}"
                         .format(**c))
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_export_scan_matches_reference(case, dtype, tol):
    inputs = make_inputs(case["batch"], case["dim"], case["nstate"], case["length"],
                         case["groups"], dtype, case["seed"], case["with_d"], case["with_z"],
                         case["with_bias"])
    kw = {"delta_softplus": case["softplus"], "return_last_state": True}
    (ours, ours_last), (ref, ref_last) = (selective_scan_export(**inputs, **kw),
                                          selective_scan_ref(**inputs, **kw))
    assert ours.dtype == ours_last.dtype == dtype
    assert ours.shape == ref.shape and ours_last.shape == ref_last.shape
    assert (ours - ref).abs().max() <= tol
    assert (ours_last - ref_last).abs().max() <= tol


@pytest.mark.parametrize("length", [1, 2, 15, 16, 17, 53])
@pytest.mark.parametrize("a_min, delta_scale", [(-0.1, 1.0), (-60.0, 30.0)],
                         ids=["slow-decay", "stiff"])
def test_export_scan_lengths_and_decays(length, a_min, delta_scale):
    """Short and odd lengths, decays from about 1 (long memory) to exp(-1000s) (underflow): the
    reference's outputs and last state, finite."""
    inputs = make_inputs(2, 6, 5, length, None, torch.float32, seed=length, a_min=a_min)
    inputs["delta"] = inputs["delta"] * delta_scale
    kw = {"delta_softplus": True, "return_last_state": True}
    (ours, ours_last), (ref, ref_last) = (selective_scan_export(**inputs, **kw),
                                          selective_scan_ref(**inputs, **kw))
    assert torch.isfinite(ours).all() and torch.isfinite(ours_last).all()
    assert ours.shape == ref.shape == (2, 6, length) and ours_last.shape == (2, 6, 5)
    assert (ours - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
    assert (ours_last - ref_last).abs().max() <= 1e-5 * max(1.0, ref_last.abs().max().item())


class _Scan(torch.nn.Module):
    """The export scan with fixed A, D and delta bias, for an ONNX export of the scan alone."""

    def __init__(self, inputs: dict[str, torch.Tensor | None]) -> None:
        super().__init__()
        for name in ("A", "D", "delta_bias"):
            self.register_buffer(name, inputs[name])

    def forward(self, u, delta, B, C, z):  # noqa: N803 (mamba-ssm's names)
        return selective_scan_export(u, delta, self.A, B, C, self.D, z, self.delta_bias,
                                     delta_softplus=True, return_last_state=True)


def test_export_scan_runs_in_onnxruntime_at_any_length():
    """Exported once (dynamic batch and length), the scan gives onnxruntime the reference's
    outputs and last state at other batch sizes and lengths, 1 included."""
    names = ("u", "delta", "B", "C", "z")
    example = make_inputs(2, 4, 3, 11, 1, torch.float32, seed=1)
    batch, frames = torch.export.Dim("batch"), torch.export.Dim("frames", min=2)
    dynamic = {"u": {0: batch, 2: frames}, "delta": {0: batch, 2: frames},
               "B": {0: batch, 3: frames}, "C": {0: batch, 3: frames}, "z": {0: batch, 2: frames}}
    with torch.no_grad():
        program = torch.onnx.export(_Scan(example), tuple(example[n] for n in names),
                                    dynamo=True, input_names=list(names),
                                    output_names=["y", "last_state"], dynamic_shapes=dynamic,
                                    verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    for batch_size, length in [(1, 1), (3, 3), (2, 4), (1, 5), (2, 17)]:
        inputs = make_inputs(batch_size, 4, 3, length, 1, torch.float32, seed=length)
        inputs.update({n: example[n] for n in ("A", "D", "delta_bias")})
        y, last = session.run(None, {n: inputs[n].numpy() for n in names})
        ref, ref_last = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
        assert y.shape == tuple(ref.shape) and last.shape == tuple(ref_last.shape)
        assert np.abs(y - ref.numpy()).max() <= 1e-5
        assert np.abs(last - ref_last.numpy()).max() <= 1e-5


def test_export_path_is_chosen_while_exporting_only(no_env):
    """``auto`` traces the scan operator under torch.export (the chunked scan's Python loop
    would not export) and stays on the chunked scan in eager mode."""
    assert resolve_scan_impl("cpu", "export") == "export"
    assert resolve_conv_impl("cpu", "export") == "torch"
    inputs = make_inputs(length=9, dtype=torch.float32)
    assert torch.equal(selective_scan_fn(**inputs, impl="export"),
                       selective_scan_export(**inputs))
    torch.manual_seed(0)
    block = Mamba(8, d_state=4, bimamba_type="v2").eval()
    x, lengths = torch.randn(2, 11, 8), torch.tensor([11, 6])
    assert ssi.resolve_scan_impl("cpu") == "torch"
    batch, frames = torch.export.Dim("batch"), torch.export.Dim("frames", min=2)
    program = torch.export.export(block, (x, lengths),
                                  dynamic_shapes=({0: batch, 1: frames}, {0: batch}))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("scan" in op for op in ops), ops
    # The program runs at other lengths and batch sizes, padding handled as in eager mode.
    x2, lengths2 = torch.randn(3, 23, 8), torch.tensor([23, 5, 17])
    with torch.no_grad():
        assert torch.allclose(program.module()(x2, lengths2), block(x2, lengths2), atol=1e-5)


def test_kernel_import_tells_not_installed_from_broken(monkeypatch, tmp_path):
    assert ssi._import_kernel("no_such_kernels", "no_such_kernels", "fn") == (
        None, ssi.NOT_INSTALLED)
    assert not ssi._import_kernel("no_such_kernels", "no_such_kernels", "fn").broken
    # Found, but a module it needs is missing: broken, not "not installed".
    (tmp_path / "half_built").mkdir()
    (tmp_path / "half_built" / "__init__.py").write_text("import half_built_cuda\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = ssi._import_kernel("half_built", "half_built.ops", "fn")
    assert loaded.broken and loaded.fn is None
    assert loaded.reason == "ModuleNotFoundError: No module named 'half_built_cuda'"
    (tmp_path / "whole").mkdir()
    (tmp_path / "whole" / "__init__.py").write_text("def fn():\n    return 7\n")
    loaded = ssi._import_kernel("whole", "whole", "fn")
    assert loaded.fn() == 7 and loaded.reason == "ok" and not loaded.broken


def test_broken_kernel_install_warns_once_where_the_kernels_would_run(
    monkeypatch, tmp_path, caplog
):
    """An installed mamba-ssm / causal-conv1d whose import raises: ``auto`` runs PyTorch, and
    says so once, at WARNING, where the kernels would have run (CUDA, ``auto``). CUDA is a
    device name here: the decision needs no CUDA tensor."""
    broken_kernel_packages(monkeypatch, tmp_path)
    assert ssi._load_mamba_ssm() == (None, f"ImportError: {UNDEFINED_SYMBOL}")
    assert ssi._load_causal_conv1d() == (None, f"OSError: {NO_CUDART}")
    inputs = make_inputs()
    with caplog.at_level(logging.INFO, logger=ssi.__name__):
        # Where the kernels would not run: CPU tensors, or a forced PyTorch path on CUDA.
        selective_scan_fn(**inputs)
        causal_conv1d_fn(inputs["u"], torch.ones(4, 3, dtype=torch.float64))
        assert ssi._dispatch("scan", "cuda", "torch") == "torch"
        monkeypatch.setenv(ssi.ENV_VAR, "torch")
        assert ssi._dispatch("conv", "cuda", None) == "torch"
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
        monkeypatch.delenv(ssi.ENV_VAR)
        for _ in range(2):
            assert ssi._dispatch("scan", "cuda", None) == "torch"
            assert ssi._dispatch("conv", torch.device("cuda", 0), None) == "torch"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    scan, conv = warnings
    assert scan.startswith(f"mamba-ssm is installed but fails to import (ImportError: "
                           f"{UNDEFINED_SYMBOL}), so CUDA tensors run the PyTorch chunked "
                           f"parallel scan, 11-15x slower")
    assert conv.startswith(f"causal-conv1d is installed but fails to import (OSError: "
                           f"{NO_CUDART}), so CUDA tensors run the PyTorch conv1d.")
    for message in warnings:
        assert f"Reinstall it against this torch ({torch.__version__})" in message
        assert "pip install -r requirements-cuda.txt --no-build-isolation" in message
        assert "MAMBA_ASR_SCAN_IMPL=torch" in message
    status = kernel_status("cuda")
    assert (status["scan_warning"], status["conv_warning"]) == (scan, conv)
    assert status["scan"] == ssi.SCAN_PATHS["torch"]
    broken = f"installed, but its import fails (ImportError: {UNDEFINED_SYMBOL})"
    assert status["mamba_ssm"] == broken
    assert kernel_status("cpu")["scan_warning"] == kernel_status("cpu")["conv_warning"] == ""
    # Forcing the kernels names the import error.
    with pytest.raises(RuntimeError, match="undefined symbol"):
        resolve_scan_impl("cuda", impl="cuda")


# --------------------------------------------------------------------------- causal conv


def conv_oracle(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, act: str | None):
    """out[:, c, t] = act(b[c] + sum_k w[c, k] x[:, c, t - K + 1 + k]), by explicit loops."""
    batch, dim, length = x.shape
    k = w.shape[1]
    out = torch.zeros_like(x)
    for t in range(length):
        for j in range(k):
            src = t - k + 1 + j
            if src >= 0:
                out[:, :, t] += w[:, j] * x[:, :, src]
    if b is not None:
        out += b[:, None]
    return F.silu(out) if act else out


@pytest.mark.parametrize("length, k, act, with_bias", [
    (13, 4, None, True), (13, 4, "silu", False), (2, 4, "silu", True), (9, 1, "swish", True),
])
def test_causal_conv_matches_sequential_reference(length, k, act, with_bias):
    g = torch.Generator().manual_seed(length + k)
    x = torch.randn(2, 5, length, generator=g, dtype=torch.float64)
    w = torch.randn(5, k, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64) if with_bias else None
    expect = conv_oracle(x, w, b, act)
    for impl in ("torch", "ref"):
        got = causal_conv1d_fn(x, w, b, activation=act, impl=impl)
        assert got.shape == x.shape
        assert torch.allclose(got, expect, rtol=1e-12, atol=1e-12), impl
    assert torch.allclose(causal_conv1d_ref(x, w, b, act), expect, rtol=1e-12, atol=1e-12)


def test_causal_conv_gradients_and_errors():
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: causal_conv1d_fn(*a, activation="silu", impl="torch"), (x, w, b))
    with pytest.raises(ValueError):
        causal_conv1d_fn(x, w[:2], b)
    with pytest.raises(ValueError):
        causal_conv1d_fn(x, w, b, activation="relu")


# --------------------------------------------------------------------------- devices


@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="Apple MPS not available")
def test_mps_matches_reference():
    inputs = make_inputs(2, 8, 16, 100, 2, torch.float32, seed=12, device="mps")
    y, last = selective_scan_fn(**inputs, delta_softplus=True, return_last_state=True)
    assert y.device.type == "mps" and y.dtype == torch.float32
    ref, ref_last = selective_scan_ref(**as64(inputs), delta_softplus=True,
                                       return_last_state=True)
    assert rel_err(y, ref) <= 1e-4 and rel_err(last, ref_last) <= 1e-4
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    selective_scan_fn(**leaves, delta_softplus=True).sum().backward()
    assert all(torch.isfinite(v.grad).all() for v in leaves.values())
    x = torch.randn(2, 8, 20, device="mps")
    w = torch.randn(8, 4, device="mps")
    assert torch.allclose(causal_conv1d_fn(x, w).cpu(), conv_oracle(x.cpu(), w.cpu(), None, None),
                          atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_cuda_matches_reference(impl):
    inputs = make_inputs(2, 8, 16, 300, 2, torch.float32, seed=13, device="cuda")
    y, last = selective_scan_fn(**inputs, delta_softplus=True, return_last_state=True, impl=impl)
    assert y.device.type == "cuda"
    ref, ref_last = selective_scan_ref(**as64(inputs), delta_softplus=True,
                                       return_last_state=True)
    assert rel_err(y, ref) <= 1e-4 and rel_err(last, ref_last) <= 1e-4
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    selective_scan_fn(**leaves, delta_softplus=True, impl=impl).sum().backward()
    cpu = {k: v.detach().cpu().double().requires_grad_() for k, v in inputs.items()}
    selective_scan_ref(**cpu, delta_softplus=True).sum().backward()
    for k in leaves:
        assert rel_err(leaves[k].grad, cpu[k].grad) <= 1e-3, k
    x = torch.randn(2, 8, 20, device="cuda")
    w = torch.randn(8, 4, device="cuda")
    b = torch.randn(8, device="cuda")
    assert torch.allclose(causal_conv1d_fn(x, w, b, "silu", impl=impl).cpu(),
                          conv_oracle(x.cpu(), w.cpu(), b.cpu(), "silu"), atol=1e-4)
