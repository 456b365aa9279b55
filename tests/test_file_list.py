"""Training from a plain folder: a CSV / TSV / JSONL list of image paths and captions streams with the shards'
guarantees (split by rank and worker, every row once per epoch, bad rows skipped and counted, exact resume), alone
or mixed with shards."""
from __future__ import annotations

import io
import itertools
import json
from collections import Counter

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from pgseg.data.file_list import file_list_pieces, file_list_samples
from pgseg.data.text import CaptionTokenizer
from pgseg.data.transforms import TrainTransform
from pgseg.data.webdataset import StreamPosition, TrainStream, expand_source, file_list_source


def _folder(tmp_path, rows: int = 40, fmt: str = 'csv'):
    """``rows`` images with captions in images/, listed in captions.<fmt>; rows 5, 17 and 30 are bad: a missing
    file, bytes that are not an image, an empty caption."""
    (tmp_path / 'images').mkdir(exist_ok=True)
    listed = []
    for i in range(rows):
        name = f'images/{i:03d}.png'
        if i == 17:
            (tmp_path / name).write_bytes(b'not an image at all')
        elif i != 5:
            buf = io.BytesIO()
            Image.new('RGB', (24 + i % 5, 20), (5 * i, 90, 200 - 4 * i)).save(buf, format='PNG')
            (tmp_path / name).write_bytes(buf.getvalue())
        listed.append((name, '' if i == 30 else f'a photo of shape {i}'))
    path = tmp_path / f'captions.{fmt}'
    if fmt == 'jsonl':
        path.write_text(''.join(json.dumps({'filepath': n, 'title': c}) + '\n' for n, c in listed) + '{broken\n')
    else:
        sep = ',' if fmt == 'csv' else '\t'
        path.write_text(f'filepath{sep}title\n' + ''.join(f'{n}{sep}{c}\n' for n, c in listed))
    return path


def _stream(sources, world, rank, workers, batch, steps=None):
    total = sum(s.length for s in sources)
    return TrainStream(sources, TrainTransform(16, 'official_pgseg'), CaptionTokenizer(16), batch,
                       steps or total // (batch * world), seed=1, shuffle_buffer=4, rank=rank, world_size=world,
                       num_workers=workers)


def _run(stream, workers):
    keys, skipped = [], Counter()
    last = {}
    for _, _, info in DataLoader(stream, batch_size=None, num_workers=workers):
        keys += info['keys']
        last[info['worker']] = info['skipped']
    for counts in last.values():
        skipped.update(counts)
    return keys, skipped


def test_rows_become_samples_and_bad_rows_are_named(tmp_path):
    path = _folder(tmp_path, rows=8, fmt='jsonl')
    urls, sizes = file_list_pieces(str(path), rows_per_piece=3)
    assert sizes == [3, 3, 3] and all(u.startswith('filelist://') for u in urls)  # 8 rows + 1 broken line
    samples = [s for u in urls for s in file_list_samples(u)]
    assert [s['__key__'] for s in samples] == [f'captions.jsonl:{i}' for i in range(1, 10)]
    assert 'jpg' not in samples[5] and samples[0]['txt'] == b'a photo of shape 0'  # row 5: no file
    assert samples[8]['__skip__'] == 'bad_row'


@pytest.mark.parametrize('fmt', ['csv', 'tsv'])
def test_every_row_once_per_epoch_over_ranks_and_workers_and_after_a_resume(tmp_path, fmt):
    path = _folder(tmp_path, fmt=fmt)
    world, workers, batch = 2, 2, 3

    def stream(rank):
        return _stream([file_list_source('mine', str(path), rows_per_piece=7)], world, rank, workers, batch)
    per_rank, skipped = [], Counter()
    for rank in range(world):
        keys, counts = _run(stream(rank), workers)
        per_rank.append(keys)
        skipped.update(counts)
    seen = [k for keys in per_rank for k in keys]
    assert len(seen) == len(set(seen)) == 36  # 6 steps x 6: every delivered row once
    bad = {f'captions.{fmt}:{line}' for line in (7, 19, 32)}  # header is line 1: rows 5, 17, 30
    assert not bad & set(seen)
    assert sum(skipped.values()) <= 3 and set(skipped) <= {'missing_image', 'bad_image', 'bad_caption'}
    # resume: rank 0 stopped after its first two batches delivers the same remaining rows
    loader = DataLoader(stream(0), batch_size=None, num_workers=workers)
    position = StreamPosition()
    for _, _, info in itertools.islice(loader, 2):
        position.update(info)
    resumed = stream(0)
    resumed.position = position
    assert _run(resumed, workers)[0] == per_rank[0][2 * batch:]


def test_a_file_list_mixes_with_shards(tmp_path):
    from tests.test_data import _uneven_shards
    (tmp_path / 'shards').mkdir()
    _uneven_shards(tmp_path / 'shards', [6, 6])
    shards = expand_source('shards', str(tmp_path / 'shards' / '{00000..00001}.tar'))
    (tmp_path / 'f').mkdir()
    files = file_list_source('files', str(_folder(tmp_path / 'f', rows=12)), rows_per_piece=5)
    # 12 shard samples and 12 rows (row 5 has no image): 5 steps of 4 leave 4 spares to stand in for the bad row
    keys, skipped = _run(_stream([shards, files], 1, 0, 0, 4, steps=5), 0)
    assert any(k.startswith('captions.csv:') for k in keys) and any(not k.startswith('captions') for k in keys)
    assert len(keys) == len(set(keys)) == 20 and 'captions.csv:7' not in keys


def test_a_list_without_its_columns_is_an_error_before_anything_runs(tmp_path):
    (tmp_path / 'list.csv').write_text('path,caption\na.png,a cat\n')
    with pytest.raises(ValueError, match=r"no column 'filepath', 'title' in its header \['path', 'caption'\]"):
        file_list_source('mine', str(tmp_path / 'list.csv'))
    source = file_list_source('mine', str(tmp_path / 'list.csv'), image_column='path', caption_column='caption')
    assert source.length == 1 and source.sizes == [1]
    (tmp_path / 'list.txt').write_text('a.png a cat\n')
    with pytest.raises(ValueError, match='must be .csv, .tsv or .jsonl'):
        file_list_source('mine', str(tmp_path / 'list.txt'))
    with pytest.raises(FileNotFoundError, match='nothere.csv not found'):
        file_list_source('mine', str(tmp_path / 'nothere.csv'))


def test_an_epoch_that_needs_every_good_row_counts_every_bad_one_by_reason(tmp_path):
    path = _folder(tmp_path, fmt='jsonl')  # 40 rows (3 bad) and a broken line: 37 good rows
    keys, skipped = _run(_stream([file_list_source('mine', str(path), rows_per_piece=9)], 1, 0, 0, 1, steps=37), 0)
    assert len(set(keys)) == 37
    assert dict(skipped) == {'missing_image': 1, 'bad_image': 1, 'bad_caption': 1, 'bad_row': 1}


def test_pack_writes_the_good_rows_as_shards_the_stream_reads(tmp_path, capsys):
    from pgseg.shards import main as shards_main
    path = _folder(tmp_path)
    out = tmp_path / 'shards'
    assert shards_main(['pack', str(path), str(out), '--samples-per-shard', '16']) == 0
    printed = capsys.readouterr().out
    assert '3 shards, 37 samples (rows left out: 1 bad_caption, 1 bad_image, 1 missing_image)' in printed
    assert json.loads((out / 'sizes.json').read_text()) == {'00000.tar': 16, '00001.tar': 16, '00002.tar': 5}
    source = expand_source('packed', str(out / '{00000..00002}.tar'))
    keys, skipped = _run(_stream([source], 1, 0, 0, 1, steps=37), 0)
    assert len(set(keys)) == 37 and not skipped
    assert shards_main(['pack', str(path), str(out)]) == 2  # never over existing shards
    assert 'already holds .tar shards' in capsys.readouterr().err


def test_pgseg_train_reads_a_file_list(tmp_path):
    from pgseg.train import main as train_main
    from tests.helpers import TINY_CONFIG
    path = _folder(tmp_path)
    out = tmp_path / 'run'
    code = train_main(['--config', TINY_CONFIG, f'train.output_dir={out}', 'log.wandb_mode=disabled',
                       f'data.sources=[{{name: mine, type: files, pattern: "{path}"}}]', 'train.max_steps=2',
                       'log.every_steps=1', 'log.group_maps_every_steps=0', 'data.num_workers=0'])
    assert code == 0 and (out / 'ckpt-00000002').is_dir()
    code = train_main(['--config', TINY_CONFIG, f'train.output_dir={tmp_path / "bad"}', 'log.wandb_mode=disabled',
                       f'data.sources=[{{name: mine, type: files, pattern: "{path}", caption_column: text}}]'])
    assert code == 2 and not (tmp_path / 'bad' / 'config.yaml').exists()  # a column the list lacks: no run starts


def test_an_edited_list_is_refused_mid_run_and_restarts_the_epoch_on_resume(tmp_path, caplog):
    from pgseg.train import main as train_main
    from tests.helpers import TINY_CONFIG
    path = _folder(tmp_path)
    urls, _ = file_list_pieces(str(path), rows_per_piece=7)
    with path.open('a') as f:
        f.write('images/000.png,one more row\n')
    with pytest.raises(RuntimeError, match='captions.csv changed while the run was reading it'):
        next(file_list_samples(urls[0]))
    out = tmp_path / 'run'
    args = ['--config', TINY_CONFIG, f'train.output_dir={out}', 'log.wandb_mode=disabled', 'data.num_workers=0',
            f'data.sources=[{{name: mine, type: files, pattern: "{path}"}}]', 'log.group_maps_every_steps=0',
            'train.steps_per_epoch=6', 'checkpoint.every_steps=1']
    assert train_main(args + ['train.max_steps=2']) == 0
    with path.open('a') as f:
        f.write('images/001.png,and another\n')
    with caplog.at_level('WARNING', logger='pgseg.train'):
        assert train_main(args + ['train.max_steps=3']) == 0
    assert 'another data layout' in caplog.text and 'the data position restarts' in caplog.text


def test_pack_stores_other_formats_as_png_and_names_missing_captions(tmp_path):
    from pgseg.shards import pack_file_list
    Image.new('RGB', (12, 10), (1, 2, 3)).save(tmp_path / 'a.gif')
    (tmp_path / 'list.jsonl').write_text(json.dumps({'filepath': 'a.gif', 'title': 'a gif'}) + '\n' +
                                         json.dumps({'filepath': 'a.gif'}) + '\n')
    sizes, left_out = pack_file_list(str(tmp_path / 'list.jsonl'), str(tmp_path / 'out'))
    assert sizes == {'00000.tar': 1} and left_out == {'missing_caption': 1}
    import tarfile
    names = tarfile.open(tmp_path / 'out' / '00000.tar').getnames()
    assert sorted(n.rsplit('.', 1)[1] for n in names) == ['png', 'txt']  # the stream reads jpg, png, webp
    with pytest.raises(ValueError, match='samples-per-shard must be >= 1'):
        pack_file_list(str(tmp_path / 'list.jsonl'), str(tmp_path / 'out2'), samples_per_shard=0)
