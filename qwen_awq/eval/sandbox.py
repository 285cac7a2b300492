"""Run untrusted generated programs (HumanEval's checks): one subprocess each, in its own session and temporary
folder, with an address-space limit (resource.setrlimit), a CPU-time backstop, no network and a wall-clock
timeout after which the whole process group is killed.

The limits are set by a bootstrap inside the child before the program runs (not with preexec_fn, which is unsafe
next to the worker threads). This guards against accidents (infinite loops, memory hogs, stray connections),
not against a program written to escape.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# The largest file a program may write (stderr included): enough for any traceback.
MAX_FILE_BYTES = 16 << 20
STDERR_TAIL = 2000  # characters of stderr kept for the report
CLONE_NEWNET = 0x40000000  # linux/sched.h: a new, empty network namespace

BOOTSTRAP = f"""
import ctypes, os, resource, socket, sys
path, mem, cpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, ({MAX_FILE_BYTES}, {MAX_FILE_BYTES}))
try:
    ctypes.CDLL(None, use_errno=True).unshare({CLONE_NEWNET})  # only loopback, when the kernel allows it
except (OSError, AttributeError):
    pass
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in this sandbox")
class _NoSocket(socket.socket):  # a class, so that modules subclassing socket.socket still import
    def __init__(self, *args, **kwargs):
        _no_network()
socket.socket = _NoSocket
for _name in ("create_connection", "create_server", "socketpair", "getaddrinfo", "fromfd"):
    setattr(socket, _name, _no_network)
del ctypes, _name
sys.argv = [path]
with open(path, encoding="utf-8") as _f:
    _code = compile(_f.read(), path, "exec")
exec(_code, {{"__name__": "__main__", "__file__": path}})
"""


@dataclass(frozen=True)
class ExecResult:
    status: Literal["passed", "failed", "timeout"]
    detail: str = ""  # the last line of stderr, or why it was killed

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def run_program(source: str, timeout_s: float = 10.0, memory_bytes: int = 2 << 30) -> ExecResult:
    """Run `source` as __main__; passed iff it exits 0 within timeout_s without exceeding memory_bytes."""
    with tempfile.TemporaryDirectory(prefix="qwen-awq-exec-") as tmp:
        program, errors = Path(tmp, "program.py"), Path(tmp, "stderr.txt")
        program.write_text(source, encoding="utf-8")
        cmd = [sys.executable, "-I", "-B", "-c", BOOTSTRAP, str(program), str(memory_bytes),
               str(math.ceil(timeout_s) + 1)]
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        with errors.open("wb") as err:
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                _kill_group(proc.pid)  # also whatever it forked, which may outlive it
                proc.wait()
        tail = errors.read_text(encoding="utf-8", errors="replace")[-STDERR_TAIL:]
    last = tail.strip().splitlines()[-1] if tail.strip() else ""
    if code is None:
        return ExecResult("timeout", f"killed after {timeout_s:g} s")
    if code == 0:
        return ExecResult("passed")
    if code < 0:
        return ExecResult("timeout" if -code == signal.SIGXCPU else "failed",
                          last or f"killed by {signal.Signals(-code).name}")
    return ExecResult("failed", last or f"exit status {code}")


def run_programs(sources: Sequence[str], timeout_s: float = 10.0, memory_bytes: int = 2 << 30,
                 workers: int | None = None) -> list[ExecResult]:
    """run_program over many sources in parallel threads (each waits on its own subprocess)."""
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, timeout_s, memory_bytes), sources))
