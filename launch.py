"""Entry point: ``python launch.py recipes.NAME [--field value ...]``.

Imports the recipe module, parses overrides of any field of its typed default config with tyro
(``--help`` lists them all with docstrings and defaults), and runs it. ``python launch.py`` alone lists
the recipes. Errors caused by the input or the machine (a bad flag value or checkpoint, a missing dataset,
an unwritable or full disk, a NaN loss...) end in one line ``error: ...`` on stderr and exit code 1: a
failure before training creates nothing, a later one leaves the last complete checkpoints. An unknown
field or a wrong type is rejected by tyro (exit code 2) before any work starts. Any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# MKL's matrix products on a CPU may round differently from one run to the next: its code path can depend on
# the memory it is given, and by default it may use fewer threads when the machine is busy. Its compatible
# branch in strict mode with a fixed thread count does neither, so a resumed run equals an uninterrupted one bit
# for bit. Set before torch loads MKL; values already in the environment are kept.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE,STRICT")
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


RANK_ERROR_WAIT_S = 10.0


def list_recipes() -> list[tuple[str, str]]:
    import recipes

    found = []
    for info in sorted(pkgutil.iter_modules(recipes.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"recipes.{info.name}")
        if not hasattr(module, "main"):
            continue
        doc = (module.__doc__ or "").strip().splitlines()
        found.append((f"recipes.{info.name}", doc[0] if doc else ""))
    return found


def usage() -> str:
    lines = ["usage: python launch.py recipes.NAME [--field value ...]   (add --help for a recipe's fields)", "",
             "recipes:"]
    rows = list_recipes()
    width = max(len(name) for name, _ in rows)
    lines += [f"  {name:<{width}}  {doc}" for name, doc in rows]
    return "\n".join(lines)


def one_line(message: str) -> str:
    return " ".join(message.split())


_INTERRUPT = {"count": 0, "said": False}


def _on_ctrl_c(signum, frame) -> None:
    """The first Ctrl-C unwinds the run (a KeyboardInterrupt: main prints which run to resume and exits 130).
    A second one, while that cleanup or the interpreter's shutdown still runs (seconds on a loaded machine),
    ends the process at once with the same line and status instead of a traceback: checkpoints are written
    atomically, so nothing finished is lost."""
    _INTERRUPT["count"] += 1
    if _INTERRUPT["count"] == 1:
        raise KeyboardInterrupt
    if not _INTERRUPT["said"]:
        from kd.rundir import interrupted_advice

        print(f"interrupted: {interrupted_advice()}", file=sys.stderr, flush=True)
    os._exit(130)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if not name.startswith("recipes."):
        name = f"recipes.{name}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            print(f"error: no recipe {name!r}\n\n{usage()}", file=sys.stderr)
            return 2
        raise
    if not hasattr(module, "main"):
        print(f"error: {name} is not a recipe (it has no main())", file=sys.stderr)
        return 2

    from kd import distributed
    from kd.errors import ENVIRONMENT_ERRNOS, ConfigError, KDError, describe_os_error
    from kd.rundir import interrupted_advice

    # The process's own Ctrl-C (not when a test calls main() in its process), unless the process was started
    # with SIGINT ignored (nohup, a background job of a script): that stays as the shell meant it.
    if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_ctrl_c)
    try:
        return int(module.main(rest, prog=f"launch.py {name}") or 0)
    except KDError as exc:
        rank = int(os.environ.get("RANK", "0"))
        if isinstance(exc, ConfigError) and rank != 0:
            # A bad config is refused alike by every rank of a torchrun job, and rank 0 says so: torchrun ends
            # this rank while it waits. Only an error of this rank alone outlives the wait and is printed.
            time.sleep(RANK_ERROR_WAIT_S)
            print(f"error: [rank {rank}] {one_line(str(exc))}", file=sys.stderr)
            return 1
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except OSError as exc:
        # The machine's fault (full disk, read-only or forbidden folder) where no KDError named the file;
        # any other OSError is a bug and keeps its traceback.
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(f"error: {one_line(describe_os_error(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted_advice()}", file=sys.stderr, flush=True)
        _INTERRUPT["said"] = True
        return 130
    finally:
        distributed.shutdown()  # leave a torchrun process group cleanly (no-op otherwise)


if __name__ == "__main__":
    status = main()
    # Only the interpreter's shutdown is left (its last phase resets Python-level signal handlers, so a Ctrl-C
    # there would end the process by the signal, status -2): the status is decided, a late Ctrl-C changes nothing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(status)
