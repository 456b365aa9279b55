"""pgseg.cpu_allocator: freed large blocks stay in the process (glibc), so the next step does not fault them in."""
import subprocess
import sys
from pathlib import Path

import pytest

# loads the module alone (importing pgseg would import torch, seconds per probe)
PROBE = r'''
import importlib.util, sys
spec = importlib.util.spec_from_file_location('cpu_allocator', sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
applied = module.retain_freed_memory()
def rss_mb():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096 / 2**20
x = b'\x01' * (64 * 2**20)  # 64 MiB, every page written
held = rss_mb()
del x
print(applied, round(held - rss_mb()))
'''
MODULE = str(Path(__file__).resolve().parents[1] / 'pgseg' / 'cpu_allocator.py')


def _probe(setting: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, '-c', PROBE, MODULE], capture_output=True, text=True, check=True,
                         env={'PGSEG_CPU_MALLOC': setting, 'PATH': ''}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt')
def test_retained_memory_is_kept_after_free():
    applied, released = _probe('retain')
    assert applied == 'True' and released < 8  # the 64 MiB stay mapped for reuse
    applied, released = _probe('system')
    assert applied == 'False' and released > 56  # glibc's default: the mmap'd block goes back to the system


def test_bad_setting_is_a_clear_error(monkeypatch):
    import pgseg.cpu_allocator as ca
    monkeypatch.setattr(ca, '_applied', False)
    monkeypatch.setenv('PGSEG_CPU_MALLOC', 'jemalloc')
    with pytest.raises(ValueError, match="PGSEG_CPU_MALLOC must be 'retain' or 'system', got 'jemalloc'"):
        ca.retain_freed_memory()
