"""The HumanEval sandbox: pass/fail by exit status, wall-clock kill of the whole process group (forked children
too), an address-space limit that turns memory hogs into MemoryError, and no network."""
from __future__ import annotations

import os
import time

from qwen_awq.eval.sandbox import run_program, run_programs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie awaiting its reaper is dead for our purpose
        return f.read().split()[2] != "Z"


def test_pass_and_fail():
    assert run_program("assert sorted([3, 1, 2]) == [1, 2, 3]\n").status == "passed"
    failed = run_program("def f():\n    return 1\nassert f() == 2, 'wrong answer'\n")
    assert (failed.status, failed.detail) == ("failed", "AssertionError: wrong answer")
    assert run_program("def f(:\n").detail.startswith("SyntaxError")


def test_infinite_loop_and_its_forked_child_are_killed(tmp_path):
    pid_file = tmp_path / "child.pid"
    source = (f"import os\npid = os.fork()\nif pid == 0:\n    while True:\n        pass\n"
              f"open({str(pid_file)!r}, 'w').write(str(pid))\nwhile True:\n    pass\n")
    result = run_program(source, timeout_s=1.5)
    assert result.status == "timeout"
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:  # SIGKILL delivery is asynchronous
        time.sleep(0.05)
    assert not _alive(child)


def test_memory_hogs_hit_the_limit():
    at_once = run_program("x = bytearray(8 << 30)\n", memory_bytes=256 << 20)
    gradual = run_program("a = []\nwhile True:\n    a.append(bytearray(10 ** 7))\n", timeout_s=20,
                          memory_bytes=256 << 20)
    assert (at_once.status, at_once.detail) == ("failed", "MemoryError")
    assert (gradual.status, gradual.detail) == ("failed", "MemoryError")  # not a timeout: the limit stopped it
    assert run_program("x = bytearray(100 << 20)\n", memory_bytes=512 << 20).passed  # under the limit is fine


def test_no_network():
    blocked = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n")
    assert blocked.status == "failed" and "network access is disabled" in blocked.detail
    via_urllib = run_program("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9', timeout=1)\n")
    assert via_urllib.status == "failed" and "network access is disabled" in via_urllib.detail


def test_many_in_parallel_keep_their_order():
    results = run_programs([f"assert {i} % 2 == 0\n" for i in range(6)], workers=3)
    assert [r.passed for r in results] == [True, False, True, False, True, False]
