"""``import cbir`` puts torch's large CPU buffers on huge pages (training ~1.5x faster where the kernel's transparent
huge pages are ``madvise``; benchmarks/huge_pages.py), and a user's ``THP_MEM_ALLOC_ENABLE=0`` is kept."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
PROBE = """
import cbir, torch
buffer = torch.empty(64 << 20, dtype=torch.uint8)
buffer.fill_(1)
rollup = open('/proc/self/smaps_rollup').read()
print(next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith('AnonHugePages')))
"""


def huge_kib(setting: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.slow  # starts subprocesses
@pytest.mark.skipif(not MODE.exists() or "[never]" in MODE.read_text(), reason="no transparent huge pages here")
def test_large_buffers_get_huge_pages_unless_the_user_says_no():
    assert huge_kib(None) >= 32 << 10  # at least half of the 64 MiB buffer in 2 MiB pages
    if "[madvise]" in MODE.read_text():  # under "always" every process gets them, asked or not
        assert huge_kib("0") == 0
