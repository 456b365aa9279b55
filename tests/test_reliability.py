"""Bad input and faults a real run meets: each ends in a clear error before anything is written, or is survived."""
from __future__ import annotations

import json
import os

import pytest
import torch

import pgseg
from pgseg.config import ConfigError, load_config
from pgseg.train import main as train_main
from pgseg.train import run
from tests.helpers import TINY_CONFIG


def _args(out, shards, *extra):
    return ['--config', TINY_CONFIG, f'train.output_dir={out}', 'log.wandb_mode=disabled',
            f'data.sources=[{{name: s, pattern: "{shards}"}}]', 'log.every_steps=1', 'log.group_maps_every_steps=0',
            'data.num_workers=0', 'train.steps_per_epoch=4', 'train.epochs=2', *extra]


@pytest.mark.parametrize('override, message', [
    ('data.batch_size=0', 'data.batch_size=0: must be at least 1'),
    ('log.every_steps=0', 'log.every_steps=0: must be at least 1'),
    ('model.image.depths=[1,1]', 'model.image.embed_factors=[1, 1, 1] has 3 entries; expected one per stage'),
    ('train.precision=fp16', 'train.precision=fp16 needs a GPU'),
    ('data.sources.3.length=10', 'data.sources has 1 entries (0-0)'),
])
def test_bad_settings_fail_before_anything_is_written(tmp_path, shards, capsys, override, message):
    """Each is one line naming the key and exit code 2, and the run directory is not created."""
    out = tmp_path / 'run'
    assert train_main(_args(out, shards, override)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_one_element_of_a_list_can_be_overridden():
    cfg = load_config(os.path.join(os.path.dirname(TINY_CONFIG), '..', '..', 'configs', 'pgseg_gcc_redcaps.yaml'),
                      ['data.sources.0.length=null', 'data.sources.1.weight=2'])
    assert cfg.data.sources[0].length is None and cfg.data.sources[1].weight == 2.0
    assert cfg.data.sources[2].weight == 1.0


def test_a_failed_start_leaves_the_run_record_alone(tmp_path, shards):
    """An existing run's config.yaml and env.json survive a start that fails (a bad shard pattern, a missing resume
    folder)."""
    out = tmp_path / 'run'
    assert train_main(_args(out, shards, 'train.max_steps=1')) == 0
    record = {name: (out / name).read_bytes() for name in ('config.yaml', 'env.json')}
    assert train_main(_args(out, str(tmp_path / 'missing-{00..01}.tar'), 'optim.lr=1')) == 2
    assert train_main(_args(out, shards, 'optim.lr=1', '--resume', str(tmp_path / 'no-such-ckpt'))) == 2
    assert {name: (out / name).read_bytes() for name in record} == record


def test_a_truncated_checkpoint_names_itself_and_auto_resume_falls_back(tmp_path, shards, capsys, caplog):
    out = tmp_path / 'run'
    assert train_main(_args(out, shards, 'train.max_steps=4', 'checkpoint.every_steps=2',
                            'checkpoint.keep_last=3')) == 0
    weights = out / 'ckpt-00000004' / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:1000])  # a write cut short outside pgseg's atomic rename
    # an explicit resume from it: an error naming the folder and the file
    code = train_main(_args(out, shards, 'train.max_steps=6', '--resume', str(out / 'ckpt-00000004')))
    assert code == 2
    err = capsys.readouterr().err
    assert 'ckpt-00000004' in err and 'model.safetensors cannot be read' in err
    # resume: auto says so and continues from the previous complete checkpoint
    cfg = load_config(TINY_CONFIG, _args(out, shards, 'train.max_steps=6')[2:])
    with caplog.at_level('WARNING'):
        state = run(cfg)
    assert state.step == 6
    assert any('cannot resume from' in r.getMessage() and 'ckpt-00000004' in r.getMessage() for r in caplog.records)
    steps = [json.loads(line)['step'] for line in open(out / 'metrics.jsonl') if 'train/loss' in line]
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6]  # steps 3 and 4 again, from ckpt-00000002


def test_model_config_rules_hold_for_configs_built_in_code():
    cfg = load_config(TINY_CONFIG).model
    cfg.image.num_heads = [2, 2]
    with pytest.raises(ConfigError, match=r'model.image.num_heads=\[2, 2\] has 2 entries'):
        pgseg.build_model(cfg)


def test_fp16_on_a_cpu_is_refused_by_name():
    from pgseg.runtime.precision import resolve_precision
    with pytest.raises(ConfigError, match='train.precision=fp16 needs a GPU'):
        resolve_precision('fp16', torch.device('cpu'))


def test_temporaries_of_interrupted_writes_are_removed_at_start(tmp_path, shards):
    """A kill during a checkpoint write leaves a temporary folder; the next run in the directory removes it (and
    nothing else)."""
    out = tmp_path / 'run'
    (out / '.ckpt-00000004.tmp-abc123').mkdir(parents=True)
    (out / '.ckpt-00000004.tmp-abc123' / 'model.safetensors').write_bytes(b'half')
    (out / '.ckpt-00000002.old-xyz').mkdir()
    (out / '.prompts-q1w2.tmp').write_bytes(b'half')
    import tempfile  # the names write_file_atomically's temporaries take
    for name in ('student.pt', 'results.json'):
        fd, _ = tempfile.mkstemp(prefix=f'.{name}.', suffix='.tmp', dir=out)
        os.close(fd)
    (out / 'notes.txt').write_text('mine')
    (out / '.notes.tmp').write_text('mine too')  # not a name the writers use
    assert train_main(_args(out, shards, 'train.max_steps=1')) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith('.') and p.name != '.pgseg-run.lock') == \
        ['.notes.tmp']
    assert (out / 'notes.txt').read_text() == 'mine'


def test_a_second_run_in_a_live_runs_directory_stops_and_touches_nothing(tmp_path, shards, capsys):
    """While another process holds the run directory (the ranks of a killed launcher, say), a new run there stops
    with an error naming that process, and leaves its temporaries alone."""
    import subprocess
    import sys
    import time
    out = tmp_path / 'run'
    out.mkdir()
    (out / '.ckpt-00000002.tmp-live').mkdir()
    holder = subprocess.Popen([sys.executable, '-c', (
        'import fcntl, os, sys, time\n'
        f'fd = os.open({str(out / ".pgseg-run.lock")!r}, os.O_RDWR | os.O_CREAT)\n'
        'fcntl.flock(fd, fcntl.LOCK_EX)\n'
        'os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)\n'
        'print("held", flush=True)\n'
        'time.sleep(60)\n')], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        assert train_main(_args(out, shards, 'train.max_steps=1')) == 2
        err = capsys.readouterr().err
        assert f'another run (process {holder.pid}) is training in this directory' in err
        assert (out / '.ckpt-00000002.tmp-live').is_dir() and not (out / 'config.yaml').exists()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert train_main(_args(out, shards, 'train.max_steps=1')) == 0  # the lock died with its holder


def _alive(pid: int) -> bool:
    try:
        with open(f'/proc/{pid}/status') as f:
            return not any(line.startswith('State:') and 'Z' in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir('/proc'), reason='reads process states from /proc (Linux)')
def test_ranks_stop_when_their_launcher_is_killed(tmp_path):
    """kill -9 of torchrun: its rank dies with it instead of training on alone."""
    import signal
    import subprocess
    import sys
    import time
    worker = tmp_path / 'worker.py'
    pid_file = tmp_path / 'rank.pid'
    worker.write_text('import os, sys, time\n'
                      'from pgseg.runtime.distributed import init_distributed\n'
                      'init_distributed()\n'
                      'open(sys.argv[1] + ".tmp", "w").write(str(os.getpid()))\n'
                      'os.replace(sys.argv[1] + ".tmp", sys.argv[1])\n'
                      'time.sleep(120)\n')
    launcher = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '1',
                                 str(worker), str(pid_file)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid = None
    try:
        deadline = time.time() + 120
        while not pid_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        pid = int(pid_file.read_text())
        assert _alive(pid)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 10
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), 'the rank outlived its launcher'
    finally:
        if launcher.poll() is None:
            launcher.kill()
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _shards_with_bad_samples(folder, shards: int = 4, per_shard: int = 12):
    """Caption shards where every 4th sample has no caption and every 5th a truncated JPEG; sizes.json beside."""
    import io
    import tarfile

    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for s in range(shards):
        name = f'{s:05d}.tar'
        with tarfile.open(folder / name, 'w') as tar:
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.new('RGB', (40, 40), (40 * s, 20 * i, 90)).save(buf, format='JPEG')
                jpeg = buf.getvalue()
                files = {'jpg': jpeg[:len(jpeg) // 2] if i % 5 == 4 else jpeg}
                if i % 4 != 3:
                    files['txt'] = f'a square number {i}'.encode()
                for ext, data in files.items():
                    info = tarfile.TarInfo(f'{s:05d}{i:04d}.{ext}')
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        sizes[name] = per_shard
    (folder / 'sizes.json').write_text(json.dumps(sizes))
    return str(folder / '{00000..00003}.tar')


def _two_rank_runs(rank, port, shards, out, results):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE='2',
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE='2')
    import torch.distributed as dist
    try:
        def cfg(name, max_steps):
            return load_config(TINY_CONFIG, _args(tmp := f'{out}/{name}', shards, f'train.max_steps={max_steps}',
                                                  'data.batch_size=2', 'checkpoint.every_steps=100')[2:]), tmp
        straight = run(cfg('straight', 6)[0])
        run(cfg('resumed', 3)[0])
        resumed = run(cfg('resumed', 6)[0])
        with open(f'{results}.{rank}', 'w') as f:
            json.dump({'straight': straight.skipped, 'resumed': resumed.skipped, 'step': resumed.step}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_skip_counters_are_per_rank_across_a_resume(tmp_path):
    """Two ranks read shards with bad samples; stopped at step 3 and resumed to 6, each rank ends with the counts of
    an uninterrupted run (before, every rank restarted from rank 0's counters)."""
    import socket

    import torch.multiprocessing as mp
    shards = _shards_with_bad_samples(tmp_path / 'shards')
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    results = str(tmp_path / 'results')
    mp.spawn(_two_rank_runs, args=(port, shards, str(tmp_path), results), nprocs=2, join=True)
    ranks = [json.load(open(f'{results}.{r}')) for r in range(2)]
    assert all(r['step'] == 6 for r in ranks)
    assert ranks[0]['straight'] != ranks[1]['straight']  # the ranks read different shards
    for r in ranks:
        assert r['resumed'] == r['straight'] and sum(r['straight'].values()) > 0
    logged = {name: [json.loads(line) for line in open(tmp_path / name / 'metrics.jsonl')][-1]
              for name in ('straight', 'resumed')}
    assert logged['resumed']['data/skipped_samples'] == logged['straight']['data/skipped_samples']


def test_resume_under_another_data_layout_restarts_the_epoch(tmp_path, shards, caplog):
    """A worker's saved position means nothing under another batch size: the resume says so and restarts the
    epoch's data instead of replaying counts against another plan."""
    out = tmp_path / 'run'
    assert train_main(_args(out, shards, 'train.max_steps=2', 'data.batch_size=4')) == 0
    cfg = load_config(TINY_CONFIG, _args(out, shards, 'train.max_steps=4', 'data.batch_size=2')[2:])
    with caplog.at_level('WARNING'):
        assert run(cfg).step == 4
    assert any('another data layout' in r.getMessage() for r in caplog.records)
