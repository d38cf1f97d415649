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

def _compile_args(kernel, backend, args, kwargs):
    """(signature, constexprs, attrs, options) for one launch, typed by Triton's own launch binder.

    The binder is the one ``JITFunction.run`` uses, built for the target backend instead of the active
    driver, so arguments are specialised exactly as at a real launch: ints equal to 1 become constexprs
    and 16-divisible ints get alignment attributes (meta tensors' null data pointers count as aligned),
    and tuple arguments (the AT kernels take per-map tuples) are typed element by element.
    """
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def _describe_constexprs(kernel, constexprs) -> str:
    """``NAME=value`` for the kernel's declared constexprs (tuples shown whole), ACC left out."""
    names = kernel.arg_names
    shown = []
    for path, value in sorted(constexprs.items(), key=lambda item: item[0]):
        if len(path) != 1 or not kernel.params[path[0]].is_constexpr or names[path[0]] == "ACC":
            continue
        shown.append(f"{names[path[0]]}={value}")
    return ", ".join(shown)


@contextlib.contextmanager
def _compile_instead_of_launch(arch: int, compiled: list):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction

    original_run = JITFunction.run
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)

    def compile_only(self, *args, grid, warmup, **kwargs):
        signature, constexprs, attrs, options = _compile_args(self, backend, args, dict(kwargs))
        key = (
            self.fn.__name__,
            str(sorted(signature.items())),
            str(sorted((k, str(v)) for k, v in constexprs.items())),
            str(sorted(attrs.items())),
            (options.num_warps, options.num_stages),
        )
        if key not in {entry[0] for entry in compiled}:
            start = time.perf_counter()
            binary = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target, options=options.__dict__)
            compiled.append((key, binary, time.perf_counter() - start, _describe_constexprs(self, constexprs), signature))
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
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            pair_sets = (
                # CIFAR-like stage pairs, all in one launch (same size, 2x2 pooled, 7x7)
                (((8, 64, 32, 32), (8, 256, 32, 32)), ((8, 128, 16, 16), (8, 512, 8, 8)), ((4, 24, 7, 7), (4, 40, 7, 7))),
                # N = C = W = P = 1: scalars Triton turns into constexprs
                (((1, 1, 2, 1), (1, 3, 1, 1)),),
                # the benchmark's 8x8 case: many teacher channels, split
                (((64, 256, 8, 8), (64, 2048, 8, 8)),),
            )
            for pairs in pair_sets:
                students = [torch.empty(s, device=meta, dtype=dtype).contiguous(memory_format=fmt) for s, _ in pairs]
                teachers = [torch.empty(t, device=meta, dtype=dtype).contiguous(memory_format=fmt) for _, t in pairs]
                pools = [size for s, t in pairs for size in (s[2] // t[2], s[3] // t[3])]
                _loss, coeff = at._at_forward(students, teachers, pools, [1000.0] * len(pairs))
                grad_loss = torch.empty((), device=meta, dtype=torch.float32)
                at._at_backward(grad_loss, students, coeff, pools)
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


def _pointer_types(values) -> set[str]:
    found = set()
    for value in values:
        if isinstance(value, tuple):
            found |= _pointer_types(value)
        elif isinstance(value, str) and value.startswith("*"):
            found.add(value)
    return found


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
    for (name, _signature, _constexprs, _attrs, (num_warps, _stages)), binary, seconds, shown, signature in compiled:
        shared = binary.metadata.shared
        pointer_types = ",".join(sorted(_pointer_types(signature.values())))
        registers, spilled, count = _register_report(binary.asm["ptx"], arch)
        spilling += spilled > 0
        heavy += max_registers is not None and count > max_registers
        print(f"  {name:30s} {pointer_types:18s} {shown[:120]:58s} warps={num_warps:<2d} {registers:16s} shared={shared}B")
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
