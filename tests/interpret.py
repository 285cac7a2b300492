"""Run a test module's own `__main__` under TRITON_INTERPRET=1 in a subprocess and return the JSON it prints last.

TRITON_INTERPRET is read when a kernel is decorated, and other test modules import the kernels first, so the
interpreted run needs a fresh process: the kernel tests run their cases there and assert on the results here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run_interpreted(script: str | Path, *args: Any, timeout: int = 600, threads: int | None = None) -> Any:
    """`python script *args` with TRITON_INTERPRET=1 (and OMP_NUM_THREADS=threads if given), the repo root and
    tests/ importable; fails the test with the child's stderr tail when it exits nonzero."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
