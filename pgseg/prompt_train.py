"""``pgseg-prompt-train``: learn MVP-SEG prompts on the seen classes of a labelled dataset, with the backbone frozen.

    pgseg-prompt-train --config mvpseg_voc_15_5 backbone.name=RN50 backbone.pretrained=/path/RN50.pt
    torchrun --nproc_per_node 8 -m pgseg.prompt_train --config mvpseg_coco_stuff_156_15

One process or ``torchrun``; bf16 autocast where native (``train.precision: auto``); atomic ``ckpt-<step>``
directories and ``checkpoint.resume: auto``; a time limit; metrics.jsonl and wandb. At the end ``prompts.pt`` is
written and the validation split is evaluated over seen and unseen classes with the learned prompts and with the
hand-written templates; ``results.json`` holds both.
"""
from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointError
from .config import ConfigError
from .eval.datasets import LayoutError
from .mvpseg.config import load_prompt_config
from .mvpseg.train import run
from .runtime.cli import run_command, setup_cpu_process, setup_logging

__all__ = ['main']


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='pgseg-prompt-train', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', required=True, help='a shipped config by name (mvpseg_voc_15_5) or a YAML path')
    parser.add_argument('overrides', nargs='*', help='key=value overrides, e.g. train.steps=500')
    args = parser.parse_args(argv)
    setup_logging()
    setup_cpu_process()

    def body() -> None:
        run(load_prompt_config(args.config, args.overrides))

    return run_command('pgseg-prompt-train', body,
                       (ConfigError, CheckpointError, LayoutError, FileNotFoundError, ValueError))


if __name__ == '__main__':
    sys.exit(main())
