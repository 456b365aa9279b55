#!/usr/bin/env python3
"""pgseg benchmarks: figures, not pass/fail tests. Each mode prints a table and writes JSON.

    python scripts/benchmark.py model [--config configs/pgseg_gcc_redcaps.yaml] [--batch 8] [--steps 5]

``model``: one training step of the paper-sized model (forward with every loss, backward, AdamW), in fp32 and bf16
autocast, each in a fresh process so that peak memory is its own: median step time, images/s, the Hungarian
matching's cost (solver time in the worker thread, and the time the step waited for it), peak memory (peak RSS on
the CPU, peak allocated on a GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def measure_train_step(config: str, batch: int, steps: int, warmup: int, precision: str, device: str,
                       npr_variant: str | None) -> dict:
    import pgseg
    from pgseg.models import matching

    dev = torch.device(device)
    torch.manual_seed(0)
    cfg = pgseg.load_config(config).model
    if npr_variant:
        cfg.npr.variant = npr_variant
    model = pgseg.build_model(cfg).to(dev).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    size = cfg.image.img_size
    images = torch.randn(batch, 3, size, size, device=dev)
    captions = [f'a photo of {i} red circles and a blue square on the grass' for i in range(batch)]
    tokens = pgseg.tokenize(captions, cfg.text.context_length).to(dev)
    dtype = {'fp32': None, 'bf16': torch.bfloat16}[precision]
    times, fwd_times, match_solve, match_wait = [], [], [], []
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        matching.MATCH_TIMING.update(solve_s=0.0, wait_s=0.0, problems=0)
        _sync(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            losses = model.compute_losses(images, tokens)
        _sync(dev)
        t1 = time.perf_counter()
        losses['loss'].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(dev)
        t2 = time.perf_counter()
        if i >= warmup:
            times.append(t2 - t0)
            fwd_times.append(t1 - t0)
            match_solve.append(matching.MATCH_TIMING['solve_s'])
            match_wait.append(matching.MATCH_TIMING['wait_s'])
    step = statistics.median(times)
    if dev.type == 'cuda':
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        peak_kind = 'cuda max_memory_allocated'
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_kind = 'process peak RSS'
    return {
        'precision': precision, 'batch': batch, 'device': device, 'npr_variant': cfg.npr.variant,
        'params': sum(p.numel() for p in model.parameters()),
        'step_s_median': step, 'step_s_all': times, 'forward_s_median': statistics.median(fwd_times),
        'images_per_s': batch / step,
        'match_solve_s_median': statistics.median(match_solve), 'match_wait_s_median': statistics.median(match_wait),
        'match_solve_share': statistics.median(match_solve) / step,
        'match_wait_share': statistics.median(match_wait) / step,
        'peak_memory_mb': peak_mb, 'peak_memory_kind': peak_kind,
        'final_losses': {k: float(v.detach()) for k, v in losses.items()},
    }


def mode_model(args) -> dict:
    results = []
    for precision in args.precisions:
        cmd = [sys.executable, __file__, '_step', '--config', args.config, '--batch', str(args.batch),
               '--steps', str(args.steps), '--warmup', str(args.warmup), '--precision', precision,
               '--device', args.device] + (['--npr-variant', args.npr_variant] if args.npr_variant else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"\nmodel: {os.path.basename(args.config)}, {results[0]['params']:,} parameters, batch {args.batch}, "
          f"device {args.device}, NPR variant {results[0]['npr_variant']}, torch {torch.__version__}, "
          f'{torch.get_num_threads()} threads\n')
    head = f"{'precision':<10}{'step s':>9}{'fwd s':>9}{'img/s':>8}{'match solve':>13}{'match wait':>12}{'peak MB':>10}"
    print(head)
    print('-' * len(head))
    for r in results:
        print(f"{r['precision']:<10}{r['step_s_median']:>9.3f}{r['forward_s_median']:>9.3f}"
              f"{r['images_per_s']:>8.2f}{100 * r['match_solve_share']:>12.2f}%"
              f"{100 * r['match_wait_share']:>11.2f}%{r['peak_memory_mb']:>10.0f}")
    if len(results) == 2:
        print(f"\nbf16 / fp32 speed-up: {results[0]['step_s_median'] / results[1]['step_s_median']:.2f}x")
    return {'mode': 'model', 'machine': platform.machine(), 'cpu_count': os.cpu_count(), 'results': results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='mode', required=True)
    model = sub.add_parser('model', help='training step of the paper-sized model, fp32 and bf16')
    step = sub.add_parser('_step', help=argparse.SUPPRESS)
    for p in (model, step):
        p.add_argument('--config', default='configs/pgseg_gcc_redcaps.yaml')
        p.add_argument('--batch', type=int, default=8)
        p.add_argument('--steps', type=int, default=5)
        p.add_argument('--warmup', type=int, default=2)
        p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
        p.add_argument('--npr-variant', choices=['reference', 'paper'], default=None)
    model.add_argument('--precisions', nargs='+', default=['fp32', 'bf16'], choices=['fp32', 'bf16'])
    model.add_argument('--out', default='runs/benchmark/model.json')
    step.add_argument('--precision', choices=['fp32', 'bf16'], default='fp32')
    args = parser.parse_args(argv)
    if args.mode == '_step':
        print(json.dumps(measure_train_step(args.config, args.batch, args.steps, args.warmup, args.precision,
                                            args.device, args.npr_variant)))
        return 0
    result = mode_model(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=2)
    print(f'\nwrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
