import os
import platform
import resource

import pytest
import torch

from adtr.runtime import configure_cpu, keep_freed_memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


def test_opt_out_and_user_settings_leave_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("ADTR_MALLOC", "default")
    assert keep_freed_memory() is False
    monkeypatch.delenv("ADTR_MALLOC")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert keep_freed_memory() is False


@glibc
def test_freed_large_blocks_are_reused_not_refaulted(monkeypatch):
    for k in [k for k in os.environ if k.startswith("MALLOC_") or k == "ADTR_MALLOC"]:
        monkeypatch.delenv(k)
    threads = torch.get_num_threads()
    assert configure_cpu(threads) is True
    assert torch.get_num_threads() == threads

    def faults_of_allocations() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            torch.ones(8 << 20)  # 32 MiB, above glibc's default mmap threshold
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_allocations()  # the first block is faulted in once
    # unmapped and remapped each time, 20 x 32 MiB would be ~160,000 faults of 4 KiB pages
    assert faults_of_allocations() < 20_000
