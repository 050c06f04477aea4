"""The Triton selective scan (``impl="triton"``, opt-in) against the sequential oracle.

Without a GPU the kernels run in Triton's CPU interpreter, in a subprocess (``TRITON_INTERPRET``
must be set before the kernels are defined), and are compiled ahead of time for NVIDIA GPUs
(no device needed); with CUDA they are compiled and checked here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from test_selective_scan import as64, make_inputs, rel_err

from modules.mamba import selective_scan_interface as ssi
from modules.mamba.selective_scan_interface import selective_scan_fn
from modules.mamba.selective_scan_ref import selective_scan_ref

_TRITON_SCAN, _TRITON_WHY = ssi._load_triton_scan()
needs_triton = pytest.mark.skipif(_TRITON_SCAN is None, reason=f"triton unavailable: {_TRITON_WHY}")

# Register spill the compiled kernels may have, in bytes of spill stores per kernel: ptxas spills
# 4 bytes in the backward kernel on sm_90 at the default tiling (none elsewhere); a tiling that
# no longer fits the 255 registers a thread spills hundreds (the backward at 32 channels a
# program: over 1 KB), which is what the compile check is there to catch.
SPILL_BUDGET_BYTES = 64

# (batch, dim, N, L, groups, dtype, softplus): a partial last chunk, exactly one chunk with
# groups, L = 1 with channel blocks of 1 and N not a power of two, 3-D B and C over two channel
# blocks, float64 inputs (computed in float32).
CASES = [
    (2, 8, 4, 37, 1, "float32", True),
    (2, 8, 16, 16, 2, "float32", False),
    (1, 6, 3, 1, 2, "float32", True),
    (3, 32, 5, 50, None, "float32", True),
    (2, 4, 4, 20, 1, "float64", True),
]


def check_cases(device: str) -> dict[str, dict[str, float]]:
    """Relative errors of y, the last state and every gradient against the float64 oracle."""
    results = {}
    for i, (batch, dim, nstate, length, groups, dtype, softplus) in enumerate(CASES):
        inputs = make_inputs(batch, dim, nstate, length, groups, getattr(torch, dtype),
                             seed=20 + i, device=device)
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y, last = selective_scan_fn(**leaves, delta_softplus=softplus, return_last_state=True,
                                    impl="triton")
        g = torch.Generator().manual_seed(i)
        g_y = torch.randn(y.shape, generator=g, dtype=torch.float64)
        g_last = torch.randn(last.shape, generator=g, dtype=torch.float64)
        loss = (y.double() * g_y.to(device)).sum() + (last.double() * g_last.to(device)).sum()
        loss.backward()
        ref_leaves = {k: v.requires_grad_() for k, v in as64(inputs).items()}
        y_ref, last_ref = selective_scan_ref(**ref_leaves, delta_softplus=softplus,
                                             return_last_state=True)
        ((y_ref * g_y).sum() + (last_ref * g_last).sum()).backward()
        errors = {"y": rel_err(y, y_ref), "last": rel_err(last, last_ref)}
        errors.update({k: rel_err(leaves[k].grad, ref_leaves[k].grad) for k in leaves})
        results[f"{batch}x{dim}x{nstate}x{length} g{groups} {dtype}"] = errors
    return results


def assert_close(results: dict[str, dict[str, float]]) -> None:
    assert len(results) == len(CASES)
    for case, errors in results.items():
        assert errors["y"] <= 1e-4 and errors["last"] <= 1e-4, (case, errors)
        for name, err in errors.items():
            assert err <= 1e-3, (case, name, err)


@needs_triton
@pytest.mark.slow
def test_triton_kernels_match_the_oracle_in_the_interpreter() -> None:
    code = ("import json, sys; from test_selective_scan_triton import check_cases; "
            "print(json.dumps(check_cases('cpu')))")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close(json.loads(proc.stdout.strip().splitlines()[-1]))


@needs_triton
def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="impl='triton' compiles GPU kernels"):
        selective_scan_fn(**make_inputs(), impl="triton")
    assert ssi.resolve_conv_impl("cpu", impl="triton") == "torch"
    monkeypatch.setenv(ssi.ENV_VAR, "triton")
    assert ssi.kernel_status("cpu")["scan"].startswith("error:")


@needs_triton
def test_triton_forward_saves_chunk_states_only_when_gradients_are_wanted(monkeypatch) -> None:
    """Inference (no_grad, or inputs without requires_grad) launches the forward kernel
    without saving the state entering each chunk; a training forward saves them all. The
    launch is recorded by a stand-in, so no kernel runs."""
    from modules.mamba import selective_scan_triton as kernels

    launches = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, SAVE, **kwargs):
                launches.append((SAVE, tuple(args[7].shape)))
            return launch

    monkeypatch.setattr(kernels, "_fwd_kernel", Recorder())
    inputs = make_inputs(2, 8, 4, 40, 1, torch.float32)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    leaves = [t.clone().requires_grad_() for t in args]
    with torch.no_grad():
        kernels.selective_scan_core(*leaves)
    kernels.selective_scan_core(*args)
    kernels.selective_scan_core(*leaves)
    saved = (2, 8, 4, 3)  # (batch, dim, N, chunks of 16 steps)
    assert launches == [(False, (2, 8, 4, 1)), (False, (2, 8, 4, 1)), (True, saved)]


@needs_triton
def test_triton_rejects_inputs_past_32_bit_offsets() -> None:
    """The kernels index with int32: past 2^31 - 1 elements they fail clearly instead of
    overflowing (shapes only, on the meta device)."""
    from modules.mamba import selective_scan_triton as kernels

    def scan(batch: int, dim: int, nstate: int, length: int) -> None:
        u = torch.empty(batch, dim, length, device="meta")
        bc = torch.empty(batch, 1, nstate, length, device="meta")
        kernels.selective_scan_core(u, u, torch.empty(dim, nstate, device="meta"), bc, bc)

    with pytest.raises(ValueError, match=r"u \(batch, dim, L\) = \(64, 2048, 16384\) has "
                                         r"2,147,483,648 elements"):
        scan(64, 2048, 16384, 16384)
    with pytest.raises(ValueError, match="saved chunk states 4,294,967,296"):
        scan(1, 1024, 64, 2**20)  # u is small enough; its N x L/16 chunk states are not
    # Within the limits (u 2^30 elements, states 2^30): launch arguments are made.
    grid, _, _ = kernels._launch_args(torch.empty(1, 1024, 2**20, device="meta"),
                                      torch.empty(1, 1, 16, 2**20, device="meta"),
                                      torch.empty(1024, 16, device="meta"))
    assert grid == (1, 128)


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_triton_matches_the_oracle_and_is_stable() -> None:
    assert_close(check_cases("cuda"))
    # Long and stiff: L = 16,000, softplus bias 5, A down to -16.
    inputs = make_inputs(2, 64, 16, 16000, 1, torch.float32, seed=5, a_min=-16.0,
                         device="cuda")
    inputs["delta_bias"] = torch.full((64,), 5.0, device="cuda")
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = selective_scan_fn(**leaves, delta_softplus=True, impl="triton")
    y.sum().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(v.grad).all() for v in leaves.values())
    ref = selective_scan_fn(**inputs, delta_softplus=True, impl="torch")
    assert rel_err(y, ref) <= 1e-4


@needs_triton
@pytest.mark.parametrize("capability", [80, 90])
def test_triton_kernels_compile_for_nvidia_gpus_within_the_spill_budget(
    capability, tmp_path, monkeypatch
) -> None:
    """The interpreter runs the kernels as Python; this compiles them as a GPU would (Triton to
    PTX, then ptxas, for an A100 / H100 target, no device needed) with the block sizes of a
    Mamba layer (d_inner 1024, N 16), so type and layout errors show without a GPU, and a
    change that makes a kernel spill more than ``SPILL_BUDGET_BYTES`` (64) bytes of registers
    to local memory fails."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    from modules.mamba import selective_scan_triton as kernels

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))  # compiled here
    u, B, A = torch.empty(2, 1024, 100), torch.empty(2, 1, 16, 100), torch.empty(1024, 16)
    _, blocks, _ = kernels._launch_args(u, B, A)
    assert blocks == {"BLOCK_D": 8, "BLOCK_N": 16, "BLOCK_T": 16}
    for kernel, extra in ((kernels._fwd_kernel, {"SAVE": True}),
                          (kernels._fwd_kernel, {"SAVE": False}), (kernels._bwd_kernel, {})):
        consts = {**extra, **blocks}
        signature = {name: "constexpr" if name in consts else "*fp32" if name.endswith("_ptr")
                     else "i32" for name in kernel.arg_names}
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=consts)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": kernels.NUM_WARPS})
        assert len(compiled.asm["cubin"]) > 10_000
        ptx = tmp_path / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        arch = re.search(r"\.target (sm_\w+)", compiled.asm["ptx"]).group(1)
        assert arch.startswith(f"sm_{capability}")
        info = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={arch}", str(ptx),
                               "-o", str(tmp_path / "kernel.cubin")],
                              capture_output=True, text=True, check=True).stderr
        spilled = int(re.search(r"(\d+) bytes spill stores", info).group(1))
        assert spilled <= SPILL_BUDGET_BYTES, (f"{kernel.fn.__name__} {extra}", info)
