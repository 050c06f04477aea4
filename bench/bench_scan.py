#!/usr/bin/env python3
"""Benchmark the selective scan: our chunked PyTorch scan vs the sequential reference and mambapy.

Usage:
    python bench/bench_scan.py                          # CPU, batch 8, dim 1024, N 16
    python bench/bench_scan.py --lengths 250 1000 --repeats 3 --threads 2
    python bench/bench_scan.py --device cuda            # adds mamba-ssm's kernel when present

Needs ``pip install -r requirements-bench.txt`` (mambapy) for the mambapy column. Every
implementation x length runs in its own subprocess, so peak memory is that process's own:
on CPU the peak resident set size (``ru_maxrss``, which includes the ~0.5 GiB of the Python
+ torch runtime; the part above the inputs is shown in brackets), on CUDA
``torch.cuda.max_memory_allocated``. On CPU each subprocess is capped at ``--mem-limit-gib``
of address space, and one that runs out of memory (or is killed) is reported as OOM.
"forward" runs under ``torch.no_grad()`` (inference); "fwd+bwd" runs the forward with
gradients and backpropagates a fixed random gradient into u, delta, A, B and C. Times are the
best of ``--repeats`` runs; on CPU the system time and page faults of each best fwd+bwd run
are printed too (much of the reference's time is the operating system mapping and zeroing the
memory its autograd graph allocates). Each subprocess first checks its implementation (y and the
gradients of u, delta, A, B, C: the largest relative error is the "check" column) against
``selective_scan_ref`` on a small problem.

Implementations:
    ref       modules.mamba.selective_scan_ref.selective_scan_ref (loop over time)
    ours      selective_scan_fn(impl="torch"): the chunked parallel scan
    mambapy   mambapy.pscan.pscan (Blelloch scan over the whole sequence) inside the same
              computation, as in mambapy's own selective_scan
    mamba-ssm selective_scan_fn(impl="cuda"): the fused CUDA kernel (``--device cuda``)
    triton    selective_scan_fn(impl="triton"): our Triton kernels (``--device cuda``);
              ``--triton-blocks 8x16x4 4x16x2 ...`` times each tiling (at most D channels a
              program x T steps a chunk x W warps) as its own ``triton:DxTxW`` row
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parent.parent
GOAL_REF_SPEEDUP = 10.0
GOAL_KERNEL_SLOWDOWN = 3.0
GOAL_LENGTH = 1000
GiB = 1 << 30


# --------------------------------------------------------------------------- child


def mambapy_scan(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """(b, d, L) -> y (b, d, L) with mambapy's pscan over (b, L, d, N) decays and inputs."""
    import torch
    from mambapy.pscan import pscan

    dt = delta.transpose(1, 2)  # (b, L, d)
    decay = torch.exp(dt.unsqueeze(-1) * A)  # (b, L, d, N)
    drive = (dt * u.transpose(1, 2)).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2)
    hs = pscan(decay, drive)  # (b, L, d, N)
    return (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)


def parse_blocks(text: str) -> tuple[int, int, int]:
    """'8x16x4' -> (max channels a program, steps a chunk, warps), each a power of two."""
    try:
        values = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        values = ()
    if len(values) != 3 or any(v < 1 or v & (v - 1) for v in values):
        raise argparse.ArgumentTypeError(
            f"--triton-blocks {text!r}: expected DxTxW, three powers of two such as 8x16x4")
    return values


def scan_function(impl: str) -> Callable[..., torch.Tensor]:
    """The implementation under test, as ``fn(u, delta, A, B, C) -> y``."""
    from modules.mamba.selective_scan_interface import selective_scan_fn
    from modules.mamba.selective_scan_ref import selective_scan_ref

    if impl.startswith("triton:"):
        from modules.mamba import selective_scan_triton as kernels

        kernels.MAX_BLOCK_D, kernels.BLOCK_T, kernels.NUM_WARPS = parse_blocks(impl[7:])
        impl = "triton"

    if impl == "ref":
        return selective_scan_ref
    if impl == "ours":
        return lambda *a: selective_scan_fn(*a, impl="torch")
    if impl == "mamba-ssm":
        return lambda *a: selective_scan_fn(*a, impl="cuda")
    if impl == "triton":
        return lambda *a: selective_scan_fn(*a, impl="triton")
    if impl == "mambapy":
        return mambapy_scan
    raise ValueError(impl)


def make_inputs(
    batch: int, dim: int, nstate: int, length: int, device: str, seed: int = 0
) -> list[torch.Tensor]:
    """Mamba-like inputs: softplus-range delta, A = -(1..N) per channel, 3-D B and C."""
    import torch

    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, length, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(batch, dim, length, generator=g) - 3.0)
    A = -torch.arange(1, nstate + 1, dtype=torch.float32).repeat(dim, 1)
    A = A * torch.exp(0.1 * torch.randn(dim, nstate, generator=g))
    B = torch.randn(batch, nstate, length, generator=g)
    C = torch.randn(batch, nstate, length, generator=g)
    return [t.to(device) for t in (u, delta, A, B, C)]


def peak_bytes(device: str) -> int:
    """High-water mark: the process's peak RSS on CPU, allocated CUDA memory on CUDA."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def child(args: argparse.Namespace) -> dict:
    """Measure one implementation at one length in this process; return the result."""
    import torch

    torch.set_num_threads(args.threads)
    device = args.device
    fn = scan_function(args.impl)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    # Correctness first, on a small problem: y and the gradient of every input.
    from modules.mamba.selective_scan_ref import selective_scan_ref

    small = [t.requires_grad_() for t in make_inputs(2, 16, args.nstate, 96, device, seed=1)]
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in small]
    got, ref = fn(*small), selective_scan_ref(*ref_leaves)
    g_y = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=ref.dtype)
    got.backward(g_y.to(device=device, dtype=got.dtype))
    ref.backward(g_y)
    pairs = [(got, ref)] + [(t.grad, r.grad) for t, r in zip(small, ref_leaves, strict=True)]
    check = max(((a.detach().double().cpu() - b).abs().max() / b.abs().max()).item()
                for a, b in pairs)
    del small, ref_leaves, got, ref, pairs

    inputs = make_inputs(args.batch, args.dim, args.nstate, args.length, device)
    grad_y = torch.randn(args.batch, args.dim, args.length,
                         generator=torch.Generator().manual_seed(2)).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else peak_bytes(device)

    fwd = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            y = fn(*inputs)
        sync()
        fwd.append(time.perf_counter() - t0)
        del y
    fwd_peak = peak_bytes(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    leaves = [t.clone().requires_grad_() for t in inputs]
    fwd_bwd = []  # (seconds, system seconds, page faults) per run
    for _ in range(args.repeats):
        for t in leaves:
            t.grad = None
        sync()
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        y = fn(*leaves)
        y.backward(grad_y)
        sync()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        fwd_bwd.append((time.perf_counter() - t0, r1.ru_stime - r0.ru_stime,
                        r1.ru_minflt - r0.ru_minflt + r1.ru_majflt - r0.ru_majflt))
        del y
    best = min(fwd_bwd)
    return {
        "status": "ok",
        "check": check,
        "fwd_s": min(fwd),
        "fwd_bwd_s": best[0],
        "fwd_bwd_sys_s": best[1],
        "fwd_bwd_faults": best[2],
        "base_bytes": base,
        "fwd_peak_bytes": fwd_peak,
        "fwd_bwd_peak_bytes": peak_bytes(device),
    }


def run_child(args: argparse.Namespace) -> None:
    """Entry point of a measuring subprocess: print one JSON line, OOM included."""
    if args.device == "cpu" and args.mem_limit_gib > 0:
        limit = int(args.mem_limit_gib * GiB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        result = child(args)
    except MemoryError:
        result = {"status": "OOM"}
    except RuntimeError as exc:
        text = str(exc)
        if "out of memory" in text.lower() or "can't allocate memory" in text:
            result = {"status": "OOM"}
        else:
            raise
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------- parent


def cpu_name() -> str:
    """A short processor description."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label(args: argparse.Namespace) -> str:
    """Device column of the table."""
    if args.device == "cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name(0)})"
    threads = "thread" if args.threads == 1 else "threads"
    return f"cpu ({cpu_name()}, {args.threads} {threads})"


def measure(args: argparse.Namespace, impl: str, length: int) -> dict:
    """Run one (implementation, length) subprocess and parse its result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--impl", impl,
           "--length", str(length), "--batch", str(args.batch), "--dim", str(args.dim),
           "--nstate", str(args.nstate), "--device", args.device, "--threads",
           str(args.threads), "--repeats", str(args.repeats), "--mem-limit-gib",
           str(args.mem_limit_gib)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env["OMP_NUM_THREADS"] = str(args.threads)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout >{args.timeout:.0f}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    if proc.returncode < 0 or proc.returncode == 137 or "MemoryError" in proc.stderr:
        return {"status": "OOM"}  # killed (the kernel's OOM killer sends SIGKILL)
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return {"status": f"error: {tail[:60]}"}


def fmt_mem(res: dict, key: str) -> str:
    """'1.23 (+0.45)' GiB: peak, and above the inputs."""
    peak = res[key] / GiB
    return f"{peak:6.2f} (+{max(0.0, peak - res['base_bytes'] / GiB):.2f})"


def print_table(args: argparse.Namespace, results: dict, impls: list[str]) -> None:
    """The results table, then speed and memory ratios against ours."""
    dev = device_label(args)
    mem = "peak GiB (+above inputs)" if args.device == "cpu" else "peak alloc GiB (+above inputs)"
    print(f"\nselective scan, fp32, batch {args.batch}, dim {args.dim}, N {args.nstate}; "
          f"best of {args.repeats}; memory: {mem}")
    unit, scale = ("ms", 1e3) if args.device == "cuda" else ("s", 1.0)
    w = max(10, *(len(i) for i in impls))
    head = (f"{'impl':<{w}} {'device':<{len(dev)}} {'L':>5} {'fwd ' + unit:>9} {'fwd mem':>16} "
            f"{'fwd+bwd ' + unit:>10} {'fwd+bwd mem':>16} {'check':>8}")
    print(head)
    print("-" * len(head))
    for length in args.lengths:
        for impl in impls:
            res = results.get((impl, length))
            if res is None:
                continue
            if res["status"] != "ok":
                print(f"{impl:<{w}} {dev} {length:>5} {res['status']:>9}")
                continue
            print(f"{impl:<{w}} {dev} {length:>5} {scale * res['fwd_s']:9.3f} "
                  f"{fmt_mem(res, 'fwd_peak_bytes'):>16} {scale * res['fwd_bwd_s']:10.3f} "
                  f"{fmt_mem(res, 'fwd_bwd_peak_bytes'):>16} {res['check']:8.1e}")
    if args.device == "cpu":
        system_time_report(args, results, impls, w)
    print("\nratios (other / ours: time, and peak memory above the inputs):")
    for length in args.lengths:
        ours = results.get(("ours", length))
        if not ours or ours["status"] != "ok":
            continue
        for impl in impls:
            other = results.get((impl, length))
            if impl == "ours" or other is None:
                continue
            if other["status"] != "ok":
                print(f"  L={length:<5} {impl:<{w}} {other['status']}")
                continue
            extra = [(r["fwd_bwd_peak_bytes"] - r["base_bytes"]) for r in (other, ours)]
            print(f"  L={length:<5} {impl:<{w}} fwd {other['fwd_s'] / ours['fwd_s']:7.1f}x   "
                  f"fwd+bwd {other['fwd_bwd_s'] / ours['fwd_bwd_s']:7.1f}x   "
                  f"fwd+bwd memory {extra[0] / max(extra[1], 1):6.1f}x")
    goal_report(results)


def system_time_report(
    args: argparse.Namespace, results: dict, impls: list[str], w: int
) -> None:
    """CPU: the system time of each best fwd+bwd run, and its page faults (``w``: the
    width of the implementation column)."""
    print("\nsystem time of the best fwd+bwd run (page faults: on first touch the operating "
          "system maps and\nzeroes each page of newly allocated memory):")
    for length in args.lengths:
        for impl in impls:
            res = results.get((impl, length))
            if res and res["status"] == "ok":
                print(f"  L={length:<5} {impl:<{w}} {res['fwd_bwd_sys_s']:6.2f} s of "
                      f"{res['fwd_bwd_s']:6.2f} s, {res['fwd_bwd_faults'] / 1e3:7.1f} k faults")


def goal_report(results: dict) -> None:
    """The targets at L=1000, forward+backward."""
    ours = results.get(("ours", GOAL_LENGTH))
    if not ours or ours["status"] != "ok":
        return
    print(f"\ngoals (fwd+bwd, L={GOAL_LENGTH}):")
    ref = results.get(("ref", GOAL_LENGTH))
    if ref and ref["status"] == "ok":
        speedup = ref["fwd_bwd_s"] / ours["fwd_bwd_s"]
        verdict = "met" if speedup >= GOAL_REF_SPEEDUP else "NOT met"
        print(f"  >= {GOAL_REF_SPEEDUP:.0f}x faster than the sequential reference: "
              f"{speedup:.1f}x, {verdict}")
    kernel = results.get(("mamba-ssm", GOAL_LENGTH))
    if kernel and kernel["status"] == "ok":
        slowdown = ours["fwd_bwd_s"] / kernel["fwd_bwd_s"]
        verdict = "met" if slowdown <= GOAL_KERNEL_SLOWDOWN else "NOT met"
        print(f"  <= {GOAL_KERNEL_SLOWDOWN:.0f}x the time of mamba-ssm's CUDA kernel: "
              f"{slowdown:.1f}x, {verdict}")
        tritons = [(r["fwd_bwd_s"], impl) for (impl, n), r in results.items()
                   if impl.startswith("triton") and n == GOAL_LENGTH and r["status"] == "ok"]
        if tritons:
            best, impl = min(tritons)
            slowdown = best / kernel["fwd_bwd_s"]
            verdict = "met" if slowdown <= GOAL_KERNEL_SLOWDOWN else "NOT met"
            print(f"  the same for our Triton kernels ({impl}): {slowdown:.1f}x, {verdict}")
    mp = results.get(("mambapy", GOAL_LENGTH))
    if mp and mp["status"] == "ok":
        faster = mp["fwd_bwd_s"] >= ours["fwd_bwd_s"]
        leaner = mp["fwd_bwd_peak_bytes"] > ours["fwd_bwd_peak_bytes"]
        verdict = "met" if faster and leaner else "NOT met"
        print(f"  at least as fast as mambapy with lower peak memory: "
              f"{mp['fwd_bwd_s'] / ours['fwd_bwd_s']:.1f}x the speed, "
              f"{mp['fwd_bwd_peak_bytes'] / ours['fwd_bwd_peak_bytes']:.1f}x less peak, {verdict}")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments; run every (implementation, length) subprocess; print the table."""
    parser = argparse.ArgumentParser(
        description="Benchmark selective-scan implementations (time and peak memory).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[250, 1000, 4000])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--nstate", type=int, default=16)
    parser.add_argument("--impls", nargs="+",
                        choices=["ref", "ours", "mambapy", "mamba-ssm", "triton"],
                        help="default: ref ours mambapy (+ mamba-ssm and triton on cuda when "
                             "installed)")
    parser.add_argument("--triton-blocks", nargs="+", type=parse_blocks, metavar="DxTxW",
                        help="time each Triton tiling: at most D channels a program, T steps "
                             "a chunk, W warps (default: the module's, 8x16x4)")
    parser.add_argument("--ref-max-length", type=int, default=1000,
                        help="run the sequential reference only up to this L (default 1000)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per measurement (best)")
    parser.add_argument("--mem-limit-gib", type=float, default=20.0,
                        help="address-space cap per CPU subprocess; 0 for none (default 20)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds per subprocess (default 1800)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args)
        return 0

    import importlib.util

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device")
    impls = args.impls or ["ref", "ours", "mambapy"]
    if args.impls is None and args.device == "cuda" and importlib.util.find_spec("mamba_ssm"):
        impls = ["mamba-ssm", *impls]
    if args.impls is None and args.device == "cuda" and importlib.util.find_spec("triton"):
        impls = [*impls, "triton"]
    if args.triton_blocks:
        sweep = [f"triton:{d}x{t}x{w}" for d, t, w in args.triton_blocks]
        impls = [i for i in impls if i != "triton"] + sweep
    if "mambapy" in impls and importlib.util.find_spec("mambapy") is None:
        print("mambapy is not installed (pip install -r requirements-bench.txt): skipped")
        impls.remove("mambapy")
    results: dict[tuple[str, int], dict] = {}
    for length in args.lengths:
        for impl in impls:
            if impl == "ref" and length > args.ref_max_length:
                continue
            t0 = time.perf_counter()
            res = measure(args, impl, length)
            results[(impl, length)] = res
            print(f"  {impl:<10} L={length:<5} {res['status']:<8} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print_table(args, results, impls)
    if args.json:
        rows = [{"impl": i, "length": n, "device": device_label(args), **r}
                for (i, n), r in results.items()]
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
