"""img2dataset's shards as they come: sample counts from its *_stats.json files, a disagreeing configured length as a
warning, the pgseg-shards command, and the documented img2dataset commands against the shipped configs' patterns."""
from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile

import braceexpand
import pytest

from pgseg.config import load_config
from pgseg.data.text import CaptionTokenizer
from pgseg.data.transforms import TrainTransform
from pgseg.data.webdataset import TrainStream, expand_source
from pgseg.shards import brace_pattern, main
from tests.helpers import ROOT


def _shard(path, n: int, with_image: bool = True) -> None:
    """A tar of ``n`` samples in img2dataset's layout (key.jpg, key.txt, key.json); the bytes need not decode."""
    with tarfile.open(path, 'w') as tar:
        for j in range(n):
            files = {'txt': f'caption {j}'.encode(), 'json': b'{}'}
            if with_image:
                files = {'jpg': b'\xff\xd8 not really a jpeg', **files}
            for ext, data in files.items():
                info = tarfile.TarInfo(f'{os.path.basename(path)[:-4]}{j:04d}.{ext}')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _img2dataset_folder(folder, sizes, prefix: str = '', stats: bool = True) -> None:
    """Shards as img2dataset writes them (``--oom_shard_count 5``): 00000.tar with 00000_stats.json beside it."""
    folder.mkdir(exist_ok=True)
    for i, n in enumerate(sizes):
        _shard(folder / f'{prefix}{i:05d}.tar', n)
        if stats:  # img2dataset's statistics: count is the URLs of the shard, successes the samples written
            (folder / f'{prefix}{i:05d}_stats.json').write_text(json.dumps(
                {'count': n + 3, 'successes': n, 'failed_to_download': 3, 'failed_to_resize': 0,
                 'duration': 1.5, 'status_dict': {'success': n}}))


def test_sizes_come_from_img2datasets_stats_when_there_is_no_sizes_json(tmp_path):
    _img2dataset_folder(tmp_path, [7, 3, 5])
    source = expand_source('cc', str(tmp_path / '{00000..00002}.tar'))
    assert not (tmp_path / 'sizes.json').exists()
    assert source.sizes == [7, 3, 5] and source.length == 15
    # with every size known the stream plans the epoch sample by sample (more streams than shards is fine)
    stream = TrainStream([source], TrainTransform(32, 'official_pgseg'), CaptionTokenizer(16), batch_size=2,
                         steps_per_epoch=1, world_size=2, num_workers=2)
    assert stream.sizes == [7, 3, 5]


def test_stats_follow_renamed_shards_and_sizes_json_wins(tmp_path):
    _img2dataset_folder(tmp_path, [4, 6], prefix='gcc-train-')
    assert expand_source('cc', str(tmp_path / 'gcc-train-{00000..00001}.tar')).sizes == [4, 6]
    (tmp_path / 'sizes.json').write_text(json.dumps({'gcc-train-00000.tar': 2, 'gcc-train-00001.tar': 3}))
    assert expand_source('cc', str(tmp_path / 'gcc-train-{00000..00001}.tar')).sizes == [2, 3]


def test_a_configured_length_that_disagrees_is_a_warning_naming_both_numbers(tmp_path, caplog):
    _img2dataset_folder(tmp_path, [7, 3, 5])
    with caplog.at_level(logging.WARNING, logger='pgseg.data.webdataset'):
        source = expand_source('gcc3m', str(tmp_path / '{00000..00002}.tar'), length=2891445)
    assert source.length == 15 and source.sizes == [7, 3, 5]  # the shards' metadata wins
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = record.getMessage()
    assert "'gcc3m'" in message and '2891445' in message and '15' in message and '_stats.json' in message
    assert 'the epoch uses 15' in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='pgseg.data.webdataset'):
        expand_source('gcc3m', str(tmp_path / '{00000..00002}.tar'), length=15)  # agreeing: no warning
    assert not caplog.records


def test_without_metadata_the_length_counts_and_without_either_the_error_names_the_files(tmp_path):
    _img2dataset_folder(tmp_path, [4, 4], stats=False)
    source = expand_source('s', str(tmp_path / '{00000..00001}.tar'), length=8)
    assert source.sizes is None and source.length == 8
    with pytest.raises(FileNotFoundError, match=r'00000\.tar.*sizes\.json.*00000_stats\.json.*pgseg-shards sizes'):
        expand_source('s', str(tmp_path / '{00000..00001}.tar'))
    # one shard without statistics leaves the sizes unknown (a download still running)
    (tmp_path / '00000_stats.json').write_text(json.dumps({'successes': 4}))
    with pytest.raises(FileNotFoundError, match=r'00001_stats\.json'):
        expand_source('s', str(tmp_path / '{00000..00001}.tar'))


def test_a_stats_file_without_successes_is_an_error_naming_it(tmp_path):
    _img2dataset_folder(tmp_path, [4])
    (tmp_path / '00000_stats.json').write_text(json.dumps({'count': 4}))
    with pytest.raises(ValueError, match=r'00000_stats\.json.*"successes"'):
        expand_source('s', str(tmp_path / '00000.tar'))
    (tmp_path / '00000_stats.json').write_text('{not json')
    with pytest.raises(ValueError, match=r'00000_stats\.json'):
        expand_source('s', str(tmp_path / '00000.tar'))


def test_the_command_writes_sizes_json_from_stats_and_counts(tmp_path, capsys):
    _img2dataset_folder(tmp_path, [7, 3, 5])
    os.remove(tmp_path / '00001_stats.json')  # counted in the tar instead
    (tmp_path / '00002_stats.json').write_text(json.dumps({'successes': 99}))  # a wrong count, --count sees it
    assert main(['sizes', str(tmp_path)]) == 0
    assert json.loads((tmp_path / 'sizes.json').read_text()) == {'00000.tar': 7, '00001.tar': 3, '00002.tar': 99}
    out = capsys.readouterr().out
    assert "3 shards, 109 samples (2 from img2dataset's *_stats.json, 1 counted in the tars)" in out
    assert f'pattern: {tmp_path}/{{00000..00002}}.tar' in out
    assert main(['sizes', '--count', str(tmp_path)]) == 0
    assert json.loads((tmp_path / 'sizes.json').read_text()) == {'00000.tar': 7, '00001.tar': 3, '00002.tar': 5}
    assert expand_source('s', str(tmp_path / '{00000..00002}.tar')).sizes == [7, 3, 5]


def test_the_command_counts_samples_as_the_stream_groups_them(tmp_path):
    _shard(tmp_path / 'a.tar', 4, with_image=False)  # samples without an image are samples all the same
    assert main(['sizes', str(tmp_path)]) == 0
    assert json.loads((tmp_path / 'sizes.json').read_text()) == {'a.tar': 4}


def test_the_command_names_what_is_wrong(tmp_path, capsys):
    assert main(['sizes', str(tmp_path / 'nope')]) == 2
    assert f'pgseg-shards: error: {tmp_path / "nope"} is not a folder' in capsys.readouterr().err
    assert main(['sizes', str(tmp_path)]) == 2
    assert 'holds no .tar shards' in capsys.readouterr().err
    _img2dataset_folder(tmp_path, [2])
    (tmp_path / '00000_stats.json').write_text(json.dumps({'failed_to_download': 2}))
    assert main(['sizes', str(tmp_path)]) == 2
    assert '00000_stats.json' in capsys.readouterr().err


def test_brace_patterns_of_a_folder():
    assert brace_pattern('d', [f'{i:06d}.tar' for i in range(332)]) == 'd/{000000..000331}.tar'
    assert brace_pattern('d', ['00000.tar', '00001.tar', '00003.tar', 'x.tar']) == \
        'd/{00000..00001}.tar::d/00003.tar::d/x.tar'


def _documented_commands() -> dict[str, dict[str, str]]:
    """docs/data.md's img2dataset commands: output folder name -> options (the ``common`` variable expanded)."""
    text = open(os.path.join(ROOT, 'docs', 'data.md')).read()
    block = text[text.index('### img2dataset recipes'):]
    block = block[block.index('```bash') + 7:block.index('```', block.index('```bash') + 7)]
    block = block.replace('\\\n', ' ')
    common = re.search(r'common="([^"]*)"', block).group(1)
    commands = {}
    for line in block.splitlines():
        if line.startswith('img2dataset '):
            words = line.replace('$common', common).split()
            opts = {w[2:]: v for w, v in zip(words, words[1:]) if w.startswith('--')}
            commands[os.path.basename(opts['output_folder'])] = opts
    return commands


def test_the_documented_img2dataset_commands_write_the_names_the_configs_expect():
    """img2dataset names shards ``{i:0{oom_shard_count}d}.tar`` in the output folder: every shipped config's source
    in one of the documented folders must expect exactly such names."""
    commands = _documented_commands()
    assert set(commands) == {'gcc3m_shards', 'gcc12m_shards', 'redcap12m_shards'}
    checked = 0
    for recipe in ('pgseg_gcc_redcaps', 'groupvit_gcc_yfcc'):
        for source in load_config(recipe).data.sources:
            folder, name = source.pattern.rsplit('/', 2)[-2:]
            if folder not in commands:
                continue
            width = int(commands[folder]['oom_shard_count'])
            names = list(braceexpand.braceexpand(name))
            assert names == [f'{i:0{width}d}.tar' for i in range(len(names))], (recipe, source.name)
            checked += 1
    assert checked == 5
