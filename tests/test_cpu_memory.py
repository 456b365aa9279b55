"""pgseg.runtime.cpu_memory: freed large blocks stay in the process (glibc) and large tensors start on huge-page
boundaries, so a training step does not fault its tensors in again."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

linux_only = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt, PyTorch THP allocation')
MODULE = str(Path(__file__).resolve().parents[1] / 'pgseg' / 'runtime' / 'cpu_memory.py')
# loads the module alone (importing pgseg would import torch: seconds per probe)
RETAIN_PROBE = r'''
import importlib.util, sys
spec = importlib.util.spec_from_file_location('cpu_allocator', sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
applied = module._retain_freed_blocks() if sys.argv[2] == 'retain' else False
def rss_mb():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096 / 2**20
x = b'\x01' * (64 * 2**20)  # 64 MiB, every page written
held = rss_mb()
del x
print(applied, round(held - rss_mb()))
'''
TORCH_PROBE = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
from pgseg.runtime.cpu_memory import configure_cpu_memory
state = configure_cpu_memory()
import torch
def huge_kb():
    return next(int(line.split()[1]) for line in open('/proc/self/smaps_rollup') if line.startswith('AnonHugePages:'))
before = huge_kb()
x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB written
print(json.dumps({**state, 'huge_mb': (huge_kb() - before) // 1024}))
'''
THP_MODE = Path('/sys/kernel/mm/transparent_hugepage/enabled')
thp_available = pytest.mark.skipif(not THP_MODE.is_file() or '[never]' in THP_MODE.read_text(),
                                   reason='the kernel has no transparent huge pages')


def _run(code: str, *args: str, setting: str = 'retain') -> str:
    return subprocess.run([sys.executable, '-c', code, *args], capture_output=True, text=True, check=True,
                          env={'PGSEG_CPU_MALLOC': setting, 'PATH': ''}).stdout


@linux_only
def test_retained_memory_is_kept_after_free():
    applied, released = _run(RETAIN_PROBE, MODULE, 'retain').split()
    assert applied == 'True' and int(released) < 8  # the 64 MiB stay mapped for reuse
    applied, released = _run(RETAIN_PROBE, MODULE, 'system').split()
    assert applied == 'False' and int(released) > 56  # glibc's default: the mmap'd block goes back to the system


@linux_only
@thp_available
def test_configure_cpu_memory_in_a_fresh_process():
    root = str(Path(MODULE).parents[1])
    state = json.loads(_run(TORCH_PROBE, root))
    assert state['retain'] and state['huge_pages'] and state['huge_mb'] >= 32  # most of the 64 MiB on huge pages
    state = json.loads(_run(TORCH_PROBE, root, setting='system'))
    assert not state['retain'] and not state['huge_pages']
    if '[madvise]' in THP_MODE.read_text():  # huge pages only where advised: none without the setting
        assert state['huge_mb'] == 0


def test_bad_setting_is_a_clear_error(monkeypatch):
    import pgseg.runtime.cpu_memory as ca
    monkeypatch.setattr(ca, '_state', None)
    monkeypatch.setenv('PGSEG_CPU_MALLOC', 'jemalloc')
    with pytest.raises(ValueError, match="PGSEG_CPU_MALLOC must be 'retain' or 'system', got 'jemalloc'"):
        ca.configure_cpu_memory()
