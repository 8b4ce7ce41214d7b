import os
import platform
import subprocess
import sys

import pytest

from adtr.runtime import keep_freed_memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


def test_opt_out_and_user_settings_leave_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("ADTR_MALLOC", "default")
    assert keep_freed_memory() is False
    monkeypatch.delenv("ADTR_MALLOC")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert keep_freed_memory() is False


# The allocator policy is process-wide: it is changed in a child, never in the test process.
CHILD = """
import resource
import torch
from adtr.runtime import configure_cpu

threads = torch.get_num_threads()
assert configure_cpu(threads) is True
assert torch.get_num_threads() == threads

def faults_of_allocations():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(8 << 20)  # 32 MiB, above glibc's default mmap threshold
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_allocations()  # the first block is faulted in once
print(faults_of_allocations())
"""


@pytest.mark.slow  # seconds of a child process: the full suite runs it, not the fast lane
@glibc
def test_freed_large_blocks_are_reused_not_refaulted():
    env = {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") or k == "ADTR_MALLOC")}
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    # unmapped and remapped each time, 20 x 32 MiB would be ~160,000 faults of 4 KiB pages
    assert int(r.stdout.split()[-1]) < 20_000
