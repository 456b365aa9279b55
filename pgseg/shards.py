"""``pgseg-shards``: the sample counts of webdataset shards, which set the epoch length of training, and a folder's
file list packed into shards when the data outgrows the folder.

    pgseg-shards sizes $PGSEG_DATA/gcc3m_shards $PGSEG_DATA/gcc12m_shards
    pgseg-shards sizes --count data/my_shards
    pgseg-shards pack data/mine/captions.csv data/mine_shards --samples-per-shard 10000

``sizes`` writes ``sizes.json`` ({"shard.tar": samples}) in each folder: a shard's count is the "successes" of
img2dataset's ``<shard>_stats.json`` beside it, else (or with ``--count``) the samples read from the tar, as the
training stream groups them. It prints the folder's shards as a brace pattern, for ``data.sources[].pattern``.

Training reads img2dataset's ``<shard>_stats.json`` files itself when a folder has no ``sizes.json``: the command is
for shards without them (written by another tool), for checking the tars against their metadata (``--count``), and
for the pattern.

``pack`` reads a file list (the ``files`` data source's CSV / TSV / JSONL: image paths relative to the list, and
captions) and writes img2dataset-layout shards (``00000.tar``, ...: ``<key>.jpg`` or the image's own format,
``<key>.txt``) with their ``sizes.json``. Rows that cannot be samples (a missing or undecodable image, an empty
caption, a broken JSONL line) are left out and counted by reason; each shard is written under a temporary name and
renamed when complete, and a folder that already holds shards is refused.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from itertools import groupby

from webdataset.tariterators import tarfile_samples

from .data.file_list import file_list_pieces, file_list_samples
from .data.webdataset import read_stats_size
from .runtime.cli import run_command

__all__ = ['count_samples', 'folder_sizes', 'brace_pattern', 'write_sizes', 'pack_file_list', 'main']

log = logging.getLogger('pgseg.shards')


def count_samples(path: str) -> int:
    """The samples of a tar shard as the training stream reads them (webdataset's grouping of members by key;
    unreadable members are skipped, as the stream skips them, and logged)."""
    errors = []

    def on_error(exc: Exception) -> bool:
        errors.append(exc)
        return True

    n = sum(1 for _ in tarfile_samples([{'url': path}], handler=on_error))
    if errors:
        log.warning('%s: %d unreadable parts skipped while counting (first: %s)', path, len(errors), errors[0])
    return n


def folder_sizes(folder: str, count: bool = False) -> tuple[dict[str, int], int]:
    """Samples per ``.tar`` shard of ``folder`` (sorted by name) and how many of them were counted from the tar
    rather than read from img2dataset's ``<shard>_stats.json`` (all of them with ``count``)."""
    if not os.path.isdir(folder):
        raise NotADirectoryError(f'{folder} is not a folder')
    names = sorted(n for n in os.listdir(folder) if n.endswith('.tar'))
    if not names:
        raise FileNotFoundError(f'{folder} holds no .tar shards')
    sizes, counted = {}, 0
    for name in names:
        path = os.path.join(folder, name)
        n = None if count else read_stats_size(path)
        if n is None:
            n = count_samples(path)
            counted += 1
        sizes[name] = n
    return sizes, counted


def brace_pattern(folder: str, names: list[str]) -> str:
    """``names`` as brace patterns under ``folder``, one per run of consecutive numbers of the same prefix and width,
    joined by ``::`` (``folder/{000000..000331}.tar``); names without a number are listed as they are."""
    numbered, plain = [], []
    for name in names:
        m = re.fullmatch(r'(.*?)(\d+)\.tar', name)
        if m:
            numbered.append((m.group(1), len(m.group(2)), int(m.group(2))))
        else:
            plain.append(name)
    parts = []
    for (prefix, width), group in groupby(sorted(numbered), key=lambda t: (t[0], t[1])):
        numbers = [n for _, _, n in group]
        start = prev = numbers[0]
        for n in numbers[1:] + [None]:
            if n is not None and n == prev + 1:
                prev = n
                continue
            run = f'{start:0{width}d}' if start == prev else f'{{{start:0{width}d}..{prev:0{width}d}}}'
            parts.append(os.path.join(folder, f'{prefix}{run}.tar'))
            start = prev = n
    parts += [os.path.join(folder, name) for name in plain]
    return '::'.join(parts)


def _write_sizes_json(folder: str, sizes: dict[str, int]) -> str:
    """``folder/sizes.json`` written atomically (a temporary file renamed into place); returns its path."""
    path = os.path.join(folder, 'sizes.json')
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(sizes, f, indent=1)
    os.replace(tmp, path)
    return path


def write_sizes(folder: str, count: bool = False) -> tuple[dict[str, int], int, str]:
    """Write ``folder/sizes.json`` (atomically); return the sizes, how many shards were counted, and its path."""
    sizes, counted = folder_sizes(folder, count)
    return sizes, counted, _write_sizes_json(folder, sizes)


def _sizes_command(args) -> None:
    for folder in args.folders:
        sizes, counted, path = write_sizes(folder, args.count)
        stats = len(sizes) - counted
        origin = ', '.join(p for p in (f"{stats} from img2dataset's *_stats.json" if stats else '',
                                       f'{counted} counted in the tars' if counted else '') if p)
        print(f'{folder}: {len(sizes)} shards, {sum(sizes.values())} samples ({origin}) -> {path}')
        pattern = brace_pattern(folder, list(sizes))
        print(f'  pattern: {pattern}')
        if '::' in pattern:
            print('  (the shard numbers have gaps or several prefixes: each run is one pattern, joined by ::)')


def _stored_image(data: bytes) -> tuple[str, bytes] | None:
    """(sample key, bytes) of an image as the shards store it: JPEG (phones' MPO included), PNG and WebP as they
    are, other formats (GIF, BMP, TIFF, ...) re-encoded as PNG (the stream reads jpg, png and webp); None when
    Pillow cannot read it whole."""
    import io

    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or '').lower()
            img.load()
            key = {'jpeg': 'jpg', 'mpo': 'jpg', 'png': 'png', 'webp': 'webp'}.get(fmt)
            if key is not None:
                return key, data
            buf = io.BytesIO()
            img.convert('RGBA' if 'A' in img.getbands() else 'RGB').save(buf, format='PNG')
            return 'png', buf.getvalue()
    except Exception:  # any decoder failure: the row is left out and counted
        return None


def pack_file_list(list_path: str, out: str, samples_per_shard: int = 10000, image_column: str = 'filepath',
                   caption_column: str = 'title') -> tuple[dict[str, int], dict[str, int]]:
    """Write the rows of a file list as img2dataset-layout shards in ``out`` (created; refused if it holds shards)
    with their ``sizes.json``. Returns (samples per shard, rows left out by reason)."""
    import io
    import tarfile

    from tqdm import tqdm
    if samples_per_shard < 1:
        raise ValueError(f'--samples-per-shard must be >= 1, got {samples_per_shard}')
    if os.path.isdir(out) and any(n.endswith('.tar') for n in os.listdir(out)):
        raise FileExistsError(f'{out} already holds .tar shards: pack into an empty or new folder')
    urls, sizes = file_list_pieces(list_path, image_column, caption_column, rows_per_piece=10000)
    os.makedirs(out, exist_ok=True)
    written: dict[str, int] = {}
    left_out: dict[str, int] = {}
    tar, tmp = None, ''
    width = len(str(max(samples_per_shard - 1, 1)))

    def close() -> None:  # a complete shard gets its name, and sizes.json lists every complete shard
        nonlocal tar
        if tar is not None:
            tar.close()
            os.replace(tmp, os.path.join(out, f'{len(written) - 1:05d}.tar'))
            tar = None
            _write_sizes_json(out, written)

    for sample in tqdm((s for u in urls for s in file_list_samples(u)), total=sum(sizes), unit='row',
                       desc=f'packing {os.path.basename(list_path)}'):
        caption = sample['txt'].decode('utf-8', errors='replace').strip() if 'txt' in sample else None
        image = _stored_image(sample['jpg']) if 'jpg' in sample else None
        reason = (sample.get('__skip__') or ('missing_image' if 'jpg' not in sample else None) or
                  ('bad_image' if image is None else None) or ('missing_caption' if caption is None else None) or
                  ('bad_caption' if not caption else None))  # the stream's reasons
        if reason:
            left_out[reason] = left_out.get(reason, 0) + 1
            continue
        if tar is None or written[f'{len(written) - 1:05d}.tar'] >= samples_per_shard:
            close()
            written[f'{len(written):05d}.tar'] = 0
            tmp = os.path.join(out, f'.{len(written) - 1:05d}.tar.tmp-{os.getpid()}')
            tar = tarfile.open(tmp, 'w')
        key = f'{len(written) - 1:05d}{written[f"{len(written) - 1:05d}.tar"]:0{width}d}'  # img2dataset-style
        for ext, data in (image, ('txt', caption.encode('utf-8'))):
            info = tarfile.TarInfo(f'{key}.{ext}')
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        written[f'{len(written) - 1:05d}.tar'] += 1
    close()
    if not written:
        raise ValueError(f'{list_path}: no row could be packed ({left_out})')
    return written, left_out


def _pack_command(args) -> None:
    sizes, left_out = pack_file_list(args.list, args.out, args.samples_per_shard, args.image_column,
                                     args.caption_column)
    skipped = ', '.join(f'{n} {reason}' for reason, n in sorted(left_out.items())) or 'none'
    print(f'{args.out}: {len(sizes)} shards, {sum(sizes.values())} samples (rows left out: {skipped})')
    print(f'  pattern: {brace_pattern(os.path.abspath(args.out), list(sizes))}')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='pgseg-shards', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='what', required=True)
    sizes = sub.add_parser('sizes', help='write sizes.json ({"shard.tar": samples}) beside the shards')
    sizes.add_argument('folders', nargs='+', metavar='FOLDER', help='a folder of .tar shards')
    sizes.add_argument('--count', action='store_true',
                       help="count every shard's samples in the tar (slower, exact) instead of reading img2dataset's "
                            '<shard>_stats.json')
    pack = sub.add_parser('pack', help='write a file list (CSV / TSV / JSONL of image paths and captions) as shards')
    pack.add_argument('list', help='the file list (image paths relative to it)')
    pack.add_argument('out', help='folder for the shards (created; must not hold shards yet)')
    pack.add_argument('--samples-per-shard', type=int, default=10000)
    pack.add_argument('--image-column', default='filepath', help='column (JSONL key) of the image path')
    pack.add_argument('--caption-column', default='title', help='column (JSONL key) of the caption')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    command = _sizes_command if args.what == 'sizes' else _pack_command
    return run_command('pgseg-shards', lambda: command(args), (OSError, ValueError))


if __name__ == '__main__':
    sys.exit(main())
