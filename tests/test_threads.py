"""The CPU thread policy: cores from affinity and the cgroup quota, minus the ones other processes keep busy;
--threads and OMP_NUM_THREADS win; a really busy process is seen in /proc/stat."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qwen_awq import threads
from qwen_awq.cli import main
from qwen_awq.errors import ConfigError


@pytest.fixture(autouse=True)
def _restore_torch_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("text", "cores"), [("150000 100000\n", 1.5), ("max 100000\n", None), ("400000 200000", 2.0)])
def test_cgroup_v2_quota(tmp_path, monkeypatch, text, cores):
    (tmp_path / "cpu.max").write_text(text)
    monkeypatch.setattr(threads, "CGROUP_V2", tmp_path / "cpu.max")
    assert threads.cgroup_cpu_limit() == cores


def _machine(monkeypatch, cpus: set[int], quota: float | None, busy: float) -> None:
    monkeypatch.setattr(threads, "allowed_cpus", lambda: cpus)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: quota)
    monkeypatch.setattr(threads, "busy_cores", lambda _cpus: busy)


@pytest.mark.parametrize(("cpus", "quota", "busy", "expected"), [
    ({0, 1}, None, 0.0, 2),     # idle 2-core machine: torch's default
    ({0, 1}, None, 1.0, 1),     # one busy process beside us (the case)
    ({0, 1}, None, 1.9, 1),     # never zero
    ({0, 1, 2, 3}, 1.5, 0.0, 1),  # a 1.5-core cgroup quota on a 4-core host
    ({0, 1, 2, 3, 4, 5, 6, 7}, None, 2.6, 5),
    ({3}, None, 0.0, 1),        # pinned to one core
])
def test_policy(monkeypatch, cpus, quota, busy, expected):
    _machine(monkeypatch, cpus, quota, busy)
    choice = threads.choose_threads()
    assert choice.threads == expected and choice.busy == busy


def test_overrides_and_apply(monkeypatch):
    _machine(monkeypatch, {0, 1}, None, 1.0)
    assert threads.choose_threads(3).threads == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.choose_threads().threads == 2 and threads.choose_threads().reason == "OMP_NUM_THREADS"
    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(2)
    assert threads.apply_thread_policy().threads == 1 and torch.get_num_threads() == 1
    with pytest.raises(ConfigError, match="at least 1"):
        threads.choose_threads(0)


def test_cli_threads_flag(monkeypatch, capsys):
    """`--threads N` sets OMP_NUM_THREADS for the process (so qwen_awq.load keeps N) before the command runs."""
    monkeypatch.setattr(threads, "busy_cores", lambda _cpus: 0.0)
    seen = {}

    def fake_load(path, dtype="auto", device="auto", threads=None):
        seen["env"], seen["torch"] = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
        raise SystemExit(0)

    monkeypatch.setattr("qwen_awq.loading.load", fake_load)
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "hi", "--threads", "1", "--device", "cpu"])
    assert seen == {"env": "1", "torch": 1}
    assert main(["generate", "--prompt", "hi", "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err


def test_busy_process_is_measured():
    """A busy loop pinned to one of our cores shows up as (most of) a busy core; we do not count ourselves."""
    cpu = min(threads.allowed_cpus())
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    try:
        busy = threads.busy_cores({cpu}, seconds=0.5)
    finally:
        spin.kill()
        spin.wait()
    assert 0.6 < busy <= 1.0 + 1e-6
