"""Atomic writes: an interrupted write leaves the previous file intact and no debris."""

import os
import signal
import subprocess
import sys

import pytest

from adtr.fileio import atomic_write, atomic_write_text


def test_failed_write_keeps_old_file(tmp_path):
    target = tmp_path / "config.json"
    atomic_write_text(target, "old")

    def crash(p):
        p.write_text("half of the new cont")
        raise KeyboardInterrupt  # what a Ctrl-C in the middle of a write looks like

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.slow  # seconds of a child process: the full suite runs it, not the fast lane
def test_process_killed_while_writing_keeps_old_file(tmp_path):
    target = tmp_path / "model.safetensors"
    atomic_write_text(target, "old")
    code = (
        "import sys, time\n"
        "from adtr.fileio import atomic_write\n"
        "def slow(p):\n"
        "    with open(p, 'w') as f:\n"
        "        f.write('partial'); f.flush(); print('writing', flush=True); time.sleep(30)\n"
        f"atomic_write({str(target)!r}, slow)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert target.read_text() == "old"  # only a dot-prefixed temp file is left behind
    assert all(q.name == "model.safetensors" or q.name.startswith(".model.safetensors.") for q in tmp_path.iterdir())
