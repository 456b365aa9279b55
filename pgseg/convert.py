"""``pgseg-convert``: official GroupViT / PGSeg ``.pth`` -> pgseg checkpoint directory (safetensors + YAML)."""
from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointError, load_model, save_checkpoint
from .config import ConfigError
from .runtime.cli import run_command, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='pgseg-convert',
        description='Convert an official GroupViT or PGSeg checkpoint (.pth, pickled) into pgseg\'s format: a '
                    'directory with model.safetensors and config.yaml. The .pth is read with a restricted '
                    'unpickler that refuses anything but tensors, containers and OmegaConf configs.')
    parser.add_argument('src', help='official .pth file')
    parser.add_argument('dst', help='output directory (created; replaced atomically if it exists)')
    parser.add_argument('--npr-variant', choices=['reference', 'paper'], default=None,
                        help='for PGSeg files: the NPR loss the converted model trains with (default: reference, '
                             'which keeps every official key; paper drops the release-only text prototypes)')
    args = parser.parse_args(argv)
    setup_logging()

    def body() -> None:
        model = load_model(args.src, npr_variant=args.npr_variant)
        out = save_checkpoint(args.dst, model, model.cfg)
        n = sum(p.numel() for p in model.parameters())
        print(f'wrote {out} ({model.cfg.arch}, {n:,} parameters, NPR variant {model.cfg.npr.variant})')

    return run_command('pgseg-convert', body, (CheckpointError, ConfigError))


if __name__ == '__main__':
    sys.exit(main())
