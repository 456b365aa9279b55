"""``pgseg-convert``: any model file pgseg reads -> pgseg's format (safetensors + YAML) or a transformers GroupViT
folder.

    pgseg-convert group_vit_gcc_yfcc_30e-879422e0.pth runs/groupvit            # official .pth -> pgseg
    pgseg-convert hf-hub:nvidia/groupvit-gcc-yfcc runs/groupvit                # transformers (local cache) -> pgseg
    pgseg-convert runs/groupvit runs/groupvit-hf --to hf                       # pgseg -> transformers folder
    pgseg-convert runs/pgseg runs/pgseg-hf --to hf --groupvit-part             # PGSeg: its GroupViT part only
"""
from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointError, export_hf, load_model, save_checkpoint
from .checkpoint.huggingface import summarise_keys
from .config import ConfigError
from .runtime.cli import run_command, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='pgseg-convert', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='Official .pth files are read with a restricted unpickler that refuses anything but tensors, '
               'containers and OmegaConf configs; hf-hub: names come from the local Hugging Face cache only.')
    parser.add_argument('src', help='pgseg checkpoint directory, official .pth, transformers GroupViT folder, or '
                                    'hf-hub:ORG/NAME')
    parser.add_argument('dst', help='output directory (created; replaced atomically if it exists)')
    parser.add_argument('--to', choices=['pgseg', 'hf'], default='pgseg',
                        help="output format: pgseg's (default) or a transformers GroupViT folder (config.json + "
                             'model.safetensors, loadable with GroupViTModel.from_pretrained)')
    parser.add_argument('--groupvit-part', action='store_true',
                        help='with --to hf: export the GroupViT part of a PGSeg model (transformers has no NPR '
                             'modules; they are left out and listed)')
    parser.add_argument('--npr-variant', choices=['reference', 'paper'], default=None,
                        help='for PGSeg files: the NPR loss the converted model trains with (default: reference, '
                             'which keeps every official key; paper drops the release-only text prototypes)')
    args = parser.parse_args(argv)
    setup_logging()
    if args.groupvit_part and args.to != 'hf':
        parser.error('--groupvit-part is for --to hf')

    def body() -> None:
        model = load_model(args.src, npr_variant=args.npr_variant)
        n = sum(p.numel() for p in model.parameters())
        if args.to == 'hf':
            out, left_out = export_hf(args.dst, model, groupvit_part=args.groupvit_part)
            note = f'; left out (not expressible in transformers): {summarise_keys(left_out)}' if left_out else ''
            print(f'wrote {out} (transformers GroupViT of the {model.cfg.arch} model {args.src}, {n:,} parameters)'
                  f'{note}')
        else:
            out = save_checkpoint(args.dst, model, model.cfg)
            print(f'wrote {out} ({model.cfg.arch} from {args.src}, {n:,} parameters, NPR variant '
                  f'{model.cfg.npr.variant})')

    return run_command('pgseg-convert', body, (CheckpointError, ConfigError))


if __name__ == '__main__':
    sys.exit(main())
