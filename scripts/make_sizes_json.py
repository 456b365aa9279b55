#!/usr/bin/env python3
"""Write ``sizes.json`` ({"shard.tar": sample count}) beside webdataset shards, for pgseg's epoch length.

    python scripts/make_sizes_json.py data/gcc3m_shards

Counts come from img2dataset's ``<shard>_stats.json`` ("successes") when present, else from counting the images in
each tar (slower, exact).
"""
import json
import os
import sys
import tarfile

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.webp')


def count(folder: str, name: str) -> int:
    stats = os.path.join(folder, name.replace('.tar', '_stats.json'))
    if os.path.isfile(stats):
        return int(json.load(open(stats))['successes'])
    with tarfile.open(os.path.join(folder, name)) as tar:
        return sum(1 for m in tar if m.name.lower().endswith(IMAGE_EXTS))


def main(argv=None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print(__doc__, file=sys.stderr)
        return 2
    folder = argv[0]
    sizes = {n: count(folder, n) for n in sorted(os.listdir(folder)) if n.endswith('.tar')}
    with open(os.path.join(folder, 'sizes.json'), 'w') as f:
        json.dump(sizes, f, indent=1)
    print(f'{len(sizes)} shards, {sum(sizes.values())} samples -> {os.path.join(folder, "sizes.json")}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
