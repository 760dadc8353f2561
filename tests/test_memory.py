"""glibc's mmap threshold is pinned by the command line, so that large arrays freed at a rebuild
leave no holes in the heap (exporter/memory.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from exporter.memory import pin_mmap_threshold

# In a fresh process: start the command line (it pins, then --help exits), or not; free a large
# block (glibc then raises its threshold past 1 MiB, unless pinned); allocate eight blocks of
# 1 MiB; print how much the heap grew.
HEAP_GROWTH = """
import sys
from exporter import cli

def heap():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            low, high = line.split()[0].split("-")
            return int(high, 16) - int(low, 16)
    return 0

if sys.argv[1] == "cli":
    try:
        cli.main(["--help"])
    except SystemExit:
        pass
big = bytearray(16 << 20)
del big
before = heap()
blocks = [bytearray(1 << 20) for _ in range(8)]
print(heap() - before)
"""


def _heap_growth(mode: str, **env: str) -> int:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}
    out = subprocess.run(
        [sys.executable, "-c", HEAP_GROWTH, mode],
        env=environ | env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc")
def test_the_command_line_keeps_large_blocks_out_of_the_heap() -> None:
    assert _heap_growth("plain") >= 4 << 20  # glibc's own behaviour: into the heap
    assert _heap_growth("cli") < 1 << 20  # pinned: each in a mapping of its own
    # The operator's setting is left alone (here, the same value, set before start).
    assert _heap_growth("plain", MALLOC_MMAP_THRESHOLD_=str(128 * 1024)) < 1 << 20


def test_the_operators_setting_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert pin_mmap_threshold() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576")
    assert pin_mmap_threshold() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert pin_mmap_threshold() is (sys.platform.startswith("linux"))
