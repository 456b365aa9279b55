"""``pgseg-transfer``: MVP-SEG+'s knowledge transfer. Learned MVP-SEG prompts teach a DeepLab student whose
classifier is their fixed class embeddings; pseudo-labels from the teacher (phase 1), then from the student itself
(phase 2); every training image used, unseen labels suppressed (the transductive setting).

    pgseg-transfer --config mvpseg_plus_voc_15_5 teacher.prompts=runs/mvpseg_voc_15_5/prompts.pt
    torchrun --nproc_per_node 4 -m pgseg.transfer --config mvpseg_plus_coco_stuff_156_15 \\
        teacher.prompts=runs/mvpseg_coco_stuff_156_15/prompts.pt student.encoder_weights=/path/resnet101.pth
    pgseg-transfer --report runs/mvpseg_plus_synthetic/seed0 runs/mvpseg_plus_synthetic/seed1   # a seeds table

One process or ``torchrun``; bf16 autocast where native (``train.precision: auto``); atomic ``ckpt-<step>``
directories and ``checkpoint.resume: auto``; a time limit; metrics.jsonl and wandb. Writes ``student_phase1.pt``
at the phase switch, ``student.pt`` at the end, and ``results.json``: mIoU(S), mIoU(U) and hIoU of the templates,
the learned prompts and the student after each phase. Keys: docs/configuration.md#mvp-seg-transfer.
"""
from __future__ import annotations

import argparse
import os
import sys

from .checkpoint import CheckpointError
from .config import ConfigError
from .eval.datasets import LayoutError
from .mvpseg.config import load_transfer_config
from .mvpseg.transfer import run, seed_report
from .runtime.cli import run_command, setup_cpu_process, setup_logging

__all__ = ['main']


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='pgseg-transfer', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default=None,
                        help='a shipped config by name (mvpseg_plus_voc_15_5) or a YAML path')
    parser.add_argument('--report', nargs='+', default=None, metavar='RUN_DIR',
                        help='instead of training: a markdown table of finished runs (seeds of one recipe), the '
                        'mean and each run of every row of their results.json')
    parser.add_argument('overrides', nargs='*', help='key=value overrides, e.g. train.steps=500')
    args = parser.parse_args(argv)
    if (args.config is None) == (args.report is None):
        parser.error('give --config (train) or --report RUN_DIR ... (summarise finished runs)')
    if args.report:
        # argparse hands key=value words after --report to it: refuse them rather than ignore them
        overrides = args.overrides + [a for a in args.report if '=' in a and not os.path.isdir(a)]
        if overrides:
            parser.error(f'--report takes run directories only; {overrides} would be ignored')
        return run_command('pgseg-transfer', lambda: print(seed_report(args.report)), (FileNotFoundError, ValueError))
    setup_logging()
    setup_cpu_process()

    def body() -> None:
        run(load_transfer_config(args.config, args.overrides))

    return run_command('pgseg-transfer', body,
                       (ConfigError, CheckpointError, LayoutError, FileNotFoundError, ValueError))


if __name__ == '__main__':
    sys.exit(main())
