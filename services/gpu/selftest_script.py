"""The sentinel self-test, run by the instance's own Python (the one with torch) on its GPU.

Stand-alone on purpose: it imports only torch and the standard library, so it runs in any
ComfyUI environment. It fills the device's allocator with a sentinel, runs elementwise
multiply, matmul, F.linear and scaled-dot-product attention several times in fp32, fp16 and
bf16, copies every result to the CPU and checks each element against a CPU reference there
(NaN/Inf are counted on the CPU: on a broken GPU ``torch.isnan`` itself returns garbage).

Prints one JSON object; exit 0 passed, 1 a check failed, 2 the test could not run.
``--inject-fault FRACTION`` leaves that fraction of each result's elements unwritten (the
sentinel stays), as a broken GPU did, to prove the check catches it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

SENTINEL = 12345.0  # exact in fp16 (12344), bf16 (12352) and fp32; far from any result
DTYPES = ("float32", "float16", "bfloat16")
# |device - reference| <= ATOL * rms(reference) + RTOL * |reference|, per dtype.
TOLERANCE = {"float32": (2e-3, 2e-3), "float16": (2e-2, 1e-2), "bfloat16": (8e-2, 4e-2)}
SIZES = {
    # name: (elementwise elements, matmul n, linear rows, sdpa (batch, heads, seq, dim))
    "full": (1 << 22, 1024, 2048, (2, 8, 512, 64)),
    "small": (1 << 16, 256, 256, (1, 4, 128, 32)),
}


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    started = time.perf_counter()
    report: dict = {"ok": False, "device": args.device, "checks": [], "error": None}
    try:
        import torch
        import torch.nn.functional  # the ops use it; a broken install fails here
    except Exception as exc:
        report["error"] = f"torch cannot be imported by {sys.executable}: {exc}"
        return _emit(report, started, 2)
    report["torch"] = torch.__version__
    if args.threads > 0:  # several GPUs test at once: share the CPU for the references
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if not _prepare_device(torch, device, report):
        return _emit(report, started, 2)
    ops = _operations(torch, args.size)
    checks_started = time.perf_counter()
    report["init_s"] = round(checks_started - started, 3)  # torch import and CUDA init
    code = _run_checks(torch, device, ops, args, report, checks_started + args.budget)
    return _emit(report, started, code)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--budget", type=float, default=10.0, help="seconds for the checks")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's)")
    parser.add_argument("--inject-fault", type=float, default=0.0, metavar="FRACTION")
    return parser.parse_args(argv)


def _prepare_device(torch, device, report: dict) -> bool:
    """Initialise CUDA and name the device in the report; False when no GPU can be used."""
    if device.type != "cuda":
        report["device_name"] = "cpu"
        return True
    try:
        torch.cuda.init()
        count = torch.cuda.device_count()
    except Exception as exc:
        count, report["error"] = 0, f"torch.cuda did not initialise: {exc}"
    if count < 1:
        report["error"] = report["error"] or (
            "torch.cuda sees no GPU (torch built without CUDA, or CUDA_VISIBLE_DEVICES "
            "names no usable GPU)"
        )
        return False
    report["device_name"] = torch.cuda.get_device_name(device)
    report["cuda"] = torch.version.cuda
    # The CPU reference is exact fp32; keep the GPU from using TF32 for fp32 work.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return True


def _operations(torch, size: str) -> dict:
    """name -> (function, CPU inputs): the ops checked, on seeded random inputs in [-1, 1)."""
    F = torch.nn.functional
    elements, n, rows, (b, h, s, d) = SIZES[size]
    gen = torch.Generator().manual_seed(1234)

    def rand(*shape: int):
        return torch.rand(*shape, generator=gen) * 2 - 1

    return {
        "mul": (lambda x, y: x * y, (rand(elements), rand(elements))),
        "matmul": (torch.matmul, (rand(n, n), rand(n, n))),
        "linear": (F.linear, (rand(rows, n), rand(n, n), rand(n))),
        "sdpa": (
            F.scaled_dot_product_attention,
            (rand(b, h, s, d), rand(b, h, s, d), rand(b, h, s, d)),
        ),
    }


def _run_checks(
    torch, device, ops: dict, args: argparse.Namespace, report: dict, deadline: float
) -> int:
    """Every op in every dtype, within the budget; 0 when all passed, 1 otherwise."""
    for dtype_name in DTYPES:
        for op_name, (fn, cpu_inputs) in ops.items():
            if time.perf_counter() > deadline:
                report["error"] = f"budget of {args.budget}s spent before {op_name} {dtype_name}"
                return 1
            check = _check_op(torch, device, op_name, fn, cpu_inputs, dtype_name, args)
            report["checks"].append(check)
    report["ok"] = all(check["bad"] == 0 for check in report["checks"])
    return 0 if report["ok"] else 1


def _check_op(torch, device, op_name: str, fn, cpu_inputs, dtype_name: str, args) -> dict:
    """One op in one dtype, ``args.iterations`` times on the device, each result compared on
    the CPU with an fp32 reference computed from the same (rounded) inputs."""
    dtype = getattr(torch, dtype_name)
    low = [t.to(dtype) for t in cpu_inputs]
    reference = fn(*[t.float() for t in low])  # fp32 on the CPU, from the same inputs
    inputs = [t.to(device) for t in low]
    check = {
        "op": op_name,
        "dtype": dtype_name,
        "shape": list(reference.shape),
        "iterations": args.iterations,
        "bad": 0,
        "nan": 0,
        "inf": 0,
        "max_abs_err": 0.0,
    }
    for _ in range(args.iterations):
        _poison(torch, device, dtype, reference.numel())
        result = fn(*inputs)
        if args.inject_fault > 0:
            _leave_unwritten(torch, result, args.inject_fault)
        got = result.to("cpu").float()  # every comparison happens on the CPU
        _compare(torch, got, reference, dtype_name, check)
    return check


def _poison(torch, device, dtype, numel: int) -> None:
    """Fill the allocator's free memory with the sentinel: the result that comes next is
    likely carved from these blocks, so an element the GPU never writes still holds it."""
    block = torch.full((numel,), SENTINEL, dtype=dtype, device=device)
    del block


def _leave_unwritten(torch, result, fraction: float) -> None:
    flat = result.view(-1)
    count = max(1, int(flat.numel() * fraction))
    index = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(7))[:count]
    flat[index.to(flat.device)] = SENTINEL


def _compare(torch, got, reference, dtype_name: str, check: dict) -> None:
    atol, rtol = TOLERANCE[dtype_name]
    rms = float(reference.pow(2).mean().sqrt()) or 1.0
    nan = torch.isnan(got)  # CPU tensors: isnan is trustworthy here
    inf = torch.isinf(got)
    err = (got - reference).abs()
    bad = ~(err <= atol * rms + rtol * reference.abs())  # NaN compares False: counted bad
    check["bad"] = max(check["bad"], int(bad.sum()))
    check["nan"] = max(check["nan"], int(nan.sum()))
    check["inf"] = max(check["inf"], int(inf.sum()))
    finite = err[~(nan | inf)]
    if finite.numel():
        check["max_abs_err"] = max(check["max_abs_err"], float(finite.max()))
    if not math.isfinite(check["max_abs_err"]):
        check["max_abs_err"] = None


def _emit(report: dict, started: float, code: int) -> int:
    report["duration_s"] = round(time.perf_counter() - started, 3)
    if code == 1 and report["error"] is None:
        failed = [c for c in report["checks"] if c["bad"]]
        report["error"] = "; ".join(
            f"{c['op']} {c['dtype']} {tuple(c['shape'])}: {c['bad']} bad element(s) "
            f"({c['nan']} NaN, {c['inf']} Inf)"
            for c in failed
        )
    print(json.dumps(report), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
