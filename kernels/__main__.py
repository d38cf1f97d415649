"""``python -m kernels aot-check [--arch 90]``: compile every kernel variant for a CUDA target, no GPU needed.

The CPU test suite runs the kernels in Triton's interpreter, which is lenient where the compiler is
not (scalar argument types, constexpr specialisation, layouts). This command drives the real
launchers on ``meta`` tensors, intercepts each launch, and compiles exactly that specialisation
(argument types, constexprs, num_warps) through Triton's full pipeline down to a cubin for the
given architecture (default sm_90, Hopper: H100/H200). It proves the kernels compile for the GPU,
not that they run there correctly; the GPU tests do that (``kernels/bench_gpu.sh``).

Must run without ``TRITON_INTERPRET`` (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

_TRITON_TYPES = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
    torch.int32: "i32",
}


def _signature_of(kernel, args, kwargs):
    """(signature, constexprs, options) for one launch, the way Triton's launcher would type it.

    Scalars go through Triton's own specialisation (an int equal to 1 becomes a constexpr, as at a
    real launch), so code that only breaks for such values fails here too.
    """
    import triton.language as tl
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip([p.name for p in kernel.params], args))
    values.update(kwargs)
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TRITON_TYPES[value.dtype]
        elif isinstance(value, (bool, int, float)):
            kind = native_specialize_impl(BaseBackend, value, False, True, True)[0]
            signature[param.name] = kind
            if kind == "constexpr":
                constexprs[param.name] = value
        elif isinstance(value, tl.dtype):
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        else:
            raise TypeError(f"{kernel.fn.__name__}: cannot type argument {param.name}={value!r}")
    return signature, constexprs, options


@contextlib.contextmanager
def _compile_instead_of_launch(arch: int, compiled: list):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    original_run = JITFunction.run
    target = GPUTarget("cuda", arch, 32)

    def compile_only(self, *args, grid, warmup, **kwargs):
        signature, constexprs, options = _signature_of(self, args, dict(kwargs))
        key = (
            self.fn.__name__,
            tuple(sorted(signature.items())),
            tuple(sorted((k, str(v)) for k, v in constexprs.items())),
            tuple(sorted(options.items())),
        )
        if key not in {entry[0] for entry in compiled}:
            start = time.perf_counter()
            binary = triton.compile(ASTSource(self, signature, constexprs), target=target, options=options)
            compiled.append((key, binary, time.perf_counter() - start))
        return None

    JITFunction.run = compile_only
    try:
        yield
    finally:
        JITFunction.run = original_run


def _drive_launchers() -> None:
    """Call every launcher with meta tensors covering each kernel specialisation the code can take."""
    from . import at, ib

    meta = torch.device("meta")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for channels_last in (False, True):
            pairs = (
                ((8, 64, 32, 32), (8, 256, 32, 32)),
                ((8, 128, 16, 16), (8, 512, 8, 8)),
                ((4, 24, 7, 7), (4, 40, 7, 7)),
                ((1, 1, 2, 1), (1, 3, 1, 1)),  # N = C = W = P = 1: scalars Triton turns into constexprs
            )
            for student_shape, teacher_shape in pairs:
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                student = torch.empty(student_shape, device=meta, dtype=dtype).contiguous(memory_format=fmt)
                teacher = torch.empty(teacher_shape, device=meta, dtype=dtype).contiguous(memory_format=fmt)
                pool_h, pool_w = student_shape[2] // teacher_shape[2], student_shape[3] // teacher_shape[3]
                _loss, direction = at._at_pair_forward(student, teacher, pool_h, pool_w)
                grad_loss = torch.empty((), device=meta, dtype=torch.float32)
                at._at_pair_backward(grad_loss, student, direction, pool_h, pool_w)
        for rows, latent_dim, classes in ((128, 512, 100), (8192, 1024, 1000), (7, 37, 10), (64, 4100, 8000), (1, 1, 1)):
            z_s, mu, logvar = (torch.empty(rows, latent_dim, device=meta, dtype=dtype) for _ in range(3))
            student, synergy = (torch.empty(rows, classes, device=meta, dtype=dtype) for _ in range(2))
            targets = torch.empty(rows, device=meta, dtype=torch.int64)
            scalar = torch.empty((), device=meta, dtype=torch.float32)
            terms, stats = ib._student_loss_forward(z_s, mu, logvar, scalar, student, synergy, targets, targets, scalar, scalar, 0.05)
            ib._student_loss_backward(terms, stats, z_s, mu, logvar, scalar, student, synergy, targets, targets, scalar, scalar, 0.05)
            z, kl = ib._reparam_kl_forward(mu, logvar, logvar)
            ib._reparam_kl_backward(mu, logvar, logvar, z, kl)
            ib._reparam_kl_backward(mu, logvar, logvar, None, kl)
            ib._reparam_kl_backward(mu, logvar, logvar, z, None)


def _register_report(ptx: str, arch: int) -> tuple[str, int, int]:
    """``ptxas -v`` on the PTX: registers per thread and spill bytes (spills would hurt bandwidth)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as handle:
        handle.write(ptx)
        handle.flush()
        suffix = "a" if arch >= 90 else ""
        result = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", handle.name, "-o", os.devnull],
            capture_output=True, text=True,
        )  # fmt: skip
    registers = re.search(r"Used (\d+) registers", result.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    spilled = int(spills.group(1)) + int(spills.group(2)) if spills else 0
    report = f"regs={registers.group(1) if registers else '?'} spill={spills.group(1) + '/' + spills.group(2) if spills else '?'}"
    return report, spilled, int(registers.group(1)) if registers else 0


def aot_check(arch: int, fail_on_spill: bool = False, max_registers: int | None = None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot-check compiles for the GPU: run it without TRITON_INTERPRET", file=sys.stderr)
        return 2
    compiled: list = []
    with _compile_instead_of_launch(arch, compiled):
        _drive_launchers()
    print(f"compiled {len(compiled)} kernel specialisations for sm_{arch}:")
    spilling = heavy = 0
    for (name, signature, constexprs, options), binary, seconds in compiled:
        shared = binary.metadata.shared
        pointer_types = ",".join(sorted({v for _, v in signature if v.startswith("*")}))
        shown = ", ".join(f"{k}={v}" for k, v in constexprs if k != "ACC")
        registers, spilled, count = _register_report(binary.asm["ptx"], arch)
        spilling += spilled > 0
        heavy += max_registers is not None and count > max_registers
        print(f"  {name:30s} {pointer_types:18s} {shown:58s} warps={dict(options).get('num_warps', 4):<2d} {registers:16s} shared={shared}B")
    if spilling:
        print(f"{spilling} specialisation(s) spill registers to local memory")
    if heavy:
        print(f"{heavy} specialisation(s) use more than {max_registers} registers per thread")
    return 1 if (fail_on_spill and spilling) or heavy else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("aot-check", help="compile every kernel specialisation for a CUDA arch (no GPU needed)")
    check.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an int (90 = Hopper)")
    check.add_argument("--fail-on-spill", action="store_true", help="exit 1 when any specialisation spills registers")
    check.add_argument("--max-registers", type=int, default=None, help="exit 1 when a specialisation uses more registers per thread")
    args = parser.parse_args(argv)
    if args.command == "aot-check":
        return aot_check(args.arch, args.fail_on_spill, args.max_registers)
    return 1


if __name__ == "__main__":
    sys.exit(main())
