"""A data source of type ``files``: a CSV, TSV or JSONL list of image paths (relative to the list's folder) and
captions, as open_clip's CSV datasets take, read with the same guarantees as webdataset shards.

The list is cut into pieces of ``rows_per_piece`` rows; each piece stands in the stream for a shard whose size is
known, so the stream plans every epoch sample by sample (split by rank and worker, every row once per epoch,
shuffled, exact resume: docs/data.md#how-the-stream-reads-them). A piece's "url" names the list, its rows and its
columns::

    filelist:///data/mine/captions.csv?rows=0-1000&image=filepath&caption=title&version=52311-1764860000000000000

``version`` is the list's size and modification time when the run planned its epochs: a list edited under a running
run is an error naming it (the plan's rows would move), and a resume over an edited list starts the epoch's data
again (the stream's layout changed).

A row yields a sample like a tar member's (``jpg`` image bytes, ``txt`` caption bytes, ``__key__`` the list's
name and line); a row that cannot be one is skipped and counted by the stream: ``missing_image`` (the file is not
there), ``bad_image`` (it does not decode), ``missing_caption`` / ``bad_caption`` (no caption, an empty one),
``bad_row`` (a JSONL line that is not a JSON object).
"""
from __future__ import annotations

import csv
import functools
import json
import os
from typing import Iterator
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ['FILES_SCHEME', 'LIST_FORMATS', 'list_format', 'list_version', 'read_rows', 'file_list_pieces',
           'is_file_list_url', 'file_list_samples']

FILES_SCHEME = 'filelist://'
LIST_FORMATS = {'.csv': ',', '.tsv': '\t', '.jsonl': None}


def list_format(path: str) -> str | None:
    """The list's column separator by its extension (None for JSONL); an unknown extension is an error."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in LIST_FORMATS:
        raise ValueError(f'{path}: a file list must be .csv, .tsv or .jsonl (got {ext or "no extension"!r})')
    return LIST_FORMATS[ext]


def list_version(path: str) -> str:
    """The list's size and modification time (ns): what a run's plan of its rows holds for."""
    st = os.stat(path)
    return f'{st.st_size}-{st.st_mtime_ns}'


@functools.lru_cache(maxsize=8)
def read_rows(path: str, image_column: str, caption_column: str, version: str) -> tuple[tuple, ...]:
    """Every data row of the list as (line number, image path or None, caption or None, reason or None), once per
    process and version of the list. The header of a CSV/TSV must name both columns (an error names what it found);
    a byte-order mark (as spreadsheets write) is allowed."""
    sep = list_format(path)
    rows = []
    with open(path, newline='', encoding='utf-8-sig') as f:
        if sep is None:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    if not isinstance(obj, dict):
                        raise ValueError('not a JSON object')
                except ValueError:
                    rows.append((line_no, None, None, 'bad_row'))
                    continue
                rows.append((line_no, _text(obj.get(image_column)), _text(obj.get(caption_column)), None))
        else:
            reader = csv.DictReader(f, delimiter=sep)
            missing = [c for c in (image_column, caption_column) if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f'{path}: no column {", ".join(repr(c) for c in missing)} in its header '
                                 f'{reader.fieldnames}; set data.sources[].image_column / caption_column')
            for row in reader:
                rows.append((reader.line_num, _text(row.get(image_column)), _text(row.get(caption_column)), None))
    return tuple(rows)


def _text(value) -> str | None:
    return None if value is None else str(value)


def file_list_pieces(path: str, image_column: str = 'filepath', caption_column: str = 'title',
                     rows_per_piece: int = 1000) -> tuple[list[str], list[int]]:
    """(piece urls, rows per piece) of a list; checked now, before a run writes anything."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'file list {path} not found')
    version = list_version(path)
    rows = read_rows(path, image_column, caption_column, version)
    if not rows:
        raise ValueError(f'{path}: the file list has no rows')
    urls, sizes = [], []
    query = f'image={quote(image_column)}&caption={quote(caption_column)}&version={version}'
    for start in range(0, len(rows), rows_per_piece):
        stop = min(start + rows_per_piece, len(rows))
        urls.append(f'{FILES_SCHEME}{quote(path)}?rows={start}-{stop}&{query}')
        sizes.append(stop - start)
    return urls, sizes


def is_file_list_url(url: str) -> bool:
    return url.startswith(FILES_SCHEME)


def file_list_samples(url: str, wanted: range | None = None) -> Iterator[dict]:
    """The samples of one piece in row order; with ``wanted`` (indices within the piece), only those rows (their
    images alone are read). A list changed since the url was made is an error naming it."""
    parts = urlsplit(url)
    path = unquote(parts.path)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    start, stop = (int(x) for x in query['rows'].split('-'))
    if list_version(path) != query['version']:
        raise RuntimeError(f'{path} changed while the run was reading it (its rows were planned at size-mtime '
                           f'{query["version"]}, now {list_version(path)}): leave the list alone during a run; a '
                           'restarted run resumes at the start of the epoch over the new list')
    rows = read_rows(path, query['image'], query['caption'], query['version'])
    picked = rows[start:stop] if wanted is None else [rows[start + i] for i in wanted if start + i < stop]
    folder, name = os.path.dirname(path), os.path.basename(path)
    for line_no, image, caption, reason in picked:
        sample: dict = {'__key__': f'{name}:{line_no}', '__url__': folder}  # logged as <folder>:<list>:<line>
        if reason is not None:
            sample['__skip__'] = reason
            yield sample
            continue
        if caption is not None:
            sample['txt'] = caption.encode('utf-8')
        if image:
            file = image if os.path.isabs(image) else os.path.join(folder, image)
            try:
                with open(file, 'rb') as f:
                    sample['jpg'] = f.read()  # any format: the decoder reads the bytes, not the name
            except OSError:
                pass  # no image key: counted as missing_image, with the row named
        yield sample
