#!/usr/bin/env python3
"""pgseg benchmarks: figures, not pass/fail tests. Each mode prints a table and writes ``<out-dir>/<mode>.json``.

    python scripts/benchmark.py peak                      # the machine's ceilings: matmul fp32 / bf16, copy bandwidth
    python scripts/benchmark.py train [--batch 64]        # one training step of the paper-sized model, fp32 and bf16
    python scripts/benchmark.py eval [--images 4]         # zero-shot segmentation, one pass vs --two-pass per crop
    python scripts/benchmark.py data [--shards PATTERN]   # decode + augmentation of 512-pixel JPEG shards
    python scripts/benchmark.py all                       # the four at the targets' settings, then the targets
    python scripts/benchmark.py targets [--baseline F]    # the targets' figures from the JSON files of the modes
    python scripts/benchmark.py accuracy [--batch 8]      # a bf16 step per attention kernel against fp32

``peak``: large square matrix products (best of the sizes tried) and a large tensor copy (bytes read + written).
The ceiling is bf16's where the device has native bf16 and fp32's where bf16 is emulated (an AVX2 CPU, where a bf16
product runs at about 1 GFLOP/s: measured at 512 only, and left out of ``train`` unless ``--precisions`` names it).
``train``: forward with every loss, backward and AdamW, each precision in a fresh process (its own peak memory):
median step time, images/s, peak memory, FLOPs per step counted from the operators' shapes
(``torch.utils.flop_counter``: matrix products, convolutions, attention; forward and backward), achieved FLOP/s and
its fraction of the matmul ceiling measured in the same run (before and after the steps; the higher one) and
of a matmul in the ceiling's precision probed right after each timed step (the median of the steps' fractions:
the machine's drift cancels), after warming up until a step no longer grows the heap (``--warmup-extra``); NPR's
share of the step (the median of paired differences between the step with and without NPR, adjacent, same process:
EM, matching, HRS and the prototype losses), EM's forward time alone, and the share spent in the losses' all-gathers
(``--nproc 2`` runs the step under torchrun with gloo to measure it). ``--malloc system`` runs every mode with
the system's allocator defaults instead of pgseg's (``pgseg.runtime.cpu_memory``).
``eval``: crops/s and images/s on VOC-sized (500x375) images at the official protocol, one encoder pass per crop;
``--two-pass`` (or ``compare``, the default) also runs the released code's two passes (one for the group maps, one
for the embeddings) for the ratio, image by image with the order alternating; and the time to build text
embeddings for 171 classes x 80 templates.
``targets``: each target's figure from the JSON files the modes wrote (docs/performance.md#targets); ``accuracy``:
one bf16 training step per attention kernel against the same step in fp32.
``data``: images/s per worker (one thread) of decode + augmentation to 224 (``official_pgseg`` crops, large crops
only, the whole image) with and without JPEG draft decoding, each as a fraction of decoding alone; the decoder's
limits (full size, draft, and 1/8 scale: the entropy decoding that no DCT-domain reduction removes, which bounds what
draft mode can gain); Pillow's resize against the torch kernel the transforms use; the time to the first batch of a
2-worker loader. Synthetic 512-pixel JPEG shards by default, ``--shards 'dir/{00000..00009}.tar'`` for your own.
The same script runs on a GPU (``--device cuda``): CUDA synchronisation around timings, bf16, ``--compile``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_class(flags: set[str] | None = None) -> str:
    """The CPU's class for bf16 as the targets tell them apart: 'AMX' (matrix tiles), 'AVX-512 BF16', 'AVX-512'
    (bf16 converted on the fly), 'AVX2' (bf16 emulated) or 'unknown'; from /proc/cpuinfo's flags unless given."""
    if flags is None:
        try:
            with open('/proc/cpuinfo') as f:
                line = next((l for l in f if l.startswith('flags')), '')
        except OSError:
            line = ''
        flags = set(line.partition(':')[2].split())
    for name, flag in (('AMX', 'amx_bf16'), ('AVX-512 BF16', 'avx512_bf16'), ('AVX-512', 'avx512f'),
                       ('AVX2', 'avx2')):
        if flag in flags:
            return name
    return 'unknown'


def machine_info(device: torch.device) -> dict:
    info = {'machine': platform.machine(), 'processor': platform.processor(), 'cpu_count': os.cpu_count(),
            'cpu_class': cpu_class(), 'threads': torch.get_num_threads(), 'torch': torch.__version__,
            'device': str(device)}
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name()
    return info


# ---------------------------------------------------------------------------------------------------------- peak
def ceiling_precision(device: torch.device) -> str:
    """The precision whose matmul rate is the machine's ceiling: bf16 where it is native, fp32 where bf16 is
    emulated (an AVX2 CPU, where bf16 products are tens of times slower than fp32; pgseg.runtime.precision)."""
    from pgseg.runtime.precision import native_bf16
    return 'bf16' if native_bf16(device) else 'fp32'


def _ceiling_probe(device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an n x n matmul in the ceiling's precision now (median of ``reps``): the ceiling beside a training
    step, which the machine's drift would otherwise separate from the one measured before all of them. On the CPU
    2048, the best size of ``peak`` on the development machines; 8192 on a GPU."""
    dtype = {'bf16': torch.bfloat16, 'fp32': torch.float32}[ceiling_precision(device)]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / _timed(lambda: a @ b, device, reps) / 1e9


def measure_peak(device: torch.device, reps: int = 5) -> dict:
    """The best matmul rate in fp32 and bf16 over the sizes tried, and the copy bandwidth. An emulated bf16 (no
    native kernels) is measured at 512 only: a 4096 product would take minutes there."""
    sizes = [8192] if device.type == 'cuda' else [1024, 2048, 4096]
    kind = ceiling_precision(device)
    out = {'matmul_gflops': {}, 'matmul_by_size': {}, 'ceiling_precision': kind, 'bf16_native': kind == 'bf16'}
    for name, dtype in (('fp32', torch.float32), ('bf16', torch.bfloat16)):
        best = 0.0
        for n in (sizes if name == 'fp32' or out['bf16_native'] else [512]):
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            s = _timed(lambda a=a, b=b: a @ b, device, reps)
            rate = 2 * n ** 3 / s / 1e9
            out['matmul_by_size'][f'{name}_{n}'] = rate
            best = max(best, rate)
        out['matmul_gflops'][name] = best
    numel = (1 << 28) // 4  # 256 MiB of float32
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    s = _timed(lambda: dst.copy_(src), device, reps)
    out['copy_gbytes_per_s'] = 2 * src.numel() * 4 / s / 1e9  # read + write
    out['ceiling_gflops'] = out['matmul_gflops'][kind]
    return out


def mode_peak(args) -> dict:
    device = torch.device(args.device)
    r = measure_peak(device)
    print(f"\npeak ({machine_info(device)['device']}, {torch.get_num_threads()} threads)\n")
    print(f"{'matmul fp32':<22}{r['matmul_gflops']['fp32']:>10.1f} GFLOP/s")
    print(f"{'matmul bf16':<22}{r['matmul_gflops']['bf16']:>10.1f} GFLOP/s"
          + ('' if r['bf16_native'] else '  (no native bf16 on this device: emulated, measured at 512 only; the '
                                         'ceiling is fp32\'s)'))
    print(f"{'copy (read + write)':<22}{r['copy_gbytes_per_s']:>10.1f} GB/s")
    print('by size: ' + ', '.join(f'{k} {v:.0f}' for k, v in r['matmul_by_size'].items()))
    return {'mode': 'peak', **machine_info(device), **r}


# ---------------------------------------------------------------------------------------------------------- train
class _Timer:
    """Wraps a function; accumulates its wall time (device-synchronised) while ``active``."""

    def __init__(self, fn, device):
        self.fn, self.device, self.total, self.active = fn, device, 0.0, False

    def __call__(self, *a, **k):
        if not self.active:
            return self.fn(*a, **k)
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.fn(*a, **k)
        _sync(self.device)
        self.total += time.perf_counter() - t0
        return out


def _set_npr(objective, enabled: bool) -> None:
    """Turn NPR's work off (no EM iterations, no matching, no prototype losses) or back on, on a built objective."""
    if not hasattr(objective, '_npr_saved'):
        objective._npr_saved = (objective.npr, {m: m.num_iters for m in objective.model.modules()
                                                if hasattr(m, 'num_iters')})
    settings, iters = objective._npr_saved
    for m, n in iters.items():
        m.num_iters = n if enabled else 0
    objective.npr = settings if enabled else None


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# Operator families of the step's profile: the first family whose pattern matches an aten op's name takes its
# self time (time in the op itself, not in the ops it calls); everything else is 'elementwise and other'.
OP_FAMILIES = [
    ('matmul', re.compile(r'^aten::(mm|addmm|bmm|baddbmm|matmul|linear|_mkldnn|mkldnn_|addmv|mv|dot|convolution|'
                          r'_convolution|conv|_scaled_dot_product|scaled_dot_product|_flash_attention|_efficient)')),
    ('softmax', re.compile(r'^aten::(_?softmax|_?log_softmax|_softmax_backward|_log_softmax_backward)')),
    ('normalisation', re.compile(r'^aten::(native_layer_norm|layer_norm|native_batch_norm|batch_norm|_batch_norm|'
                                 r'native_layer_norm_backward|native_batch_norm_backward|linalg_vector_norm|norm)')),
    ('casts and copies', re.compile(r'^aten::(to|_to_copy|copy_|clone|contiguous)$')),
    ('reductions', re.compile(r'^aten::(sum|mean|amax|max|min|argmax|topk|logsumexp|cumsum)')),
    ('layout and indexing', re.compile(r'^aten::(cat|stack|index|index_select|gather|scatter|index_put|masked_fill|'
                                       r'one_hot|nonzero|where|slice|select|narrow|unbind|split|chunk|expand|view|'
                                       r'reshape|permute|transpose|t|as_strided|empty|zeros|ones|full|fill_|zero_|'
                                       r'new_|resize_)')),
    ('optimizer', re.compile(r'^aten::(_fused_adamw|_foreach)')),
]


def profile_families(prof, steps: int) -> dict:
    """Self CPU time per step by operator family (:data:`OP_FAMILIES`), in seconds and as a share of the profiled
    aten time, with the ten costliest operators."""
    totals: dict[str, float] = {}
    ops = []
    for event in prof.key_averages():
        if not event.key.startswith('aten::'):
            continue
        seconds = event.self_cpu_time_total / 1e6 / steps
        family = next((name for name, pattern in OP_FAMILIES if pattern.match(event.key)), 'elementwise and other')
        totals[family] = totals.get(family, 0.0) + seconds
        ops.append((seconds, event.key, family, event.count // steps))
    aten = sum(totals.values())
    ops.sort(reverse=True)
    return {'aten_self_s_per_step': aten,
            'families': {k: {'s_per_step': v, 'share': v / aten if aten else 0.0}
                         for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
            'top_ops': [{'op': k, 'family': f, 's_per_step': s, 'calls_per_step': c} for s, k, f, c in ops[:10]]}


def _fraction_beside(flops: float, step_s: list[float], probes_gflops: list[float]) -> float:
    """The median over the timed steps of each step's FLOP rate over the ceiling probed right after it."""
    return statistics.median(flops / t / 1e9 / c for t, c in zip(step_s, probes_gflops))


def _caption_tokens(batch: int, context_length: int, trim: bool = True) -> torch.Tensor:
    """[batch, L] tokens of the benchmark's captions, trimmed after the last EOT as the trainer trims (exact under
    the causal mask) unless ``trim`` is False (the released trainer's full context)."""
    import pgseg
    import pgseg.data.text
    captions = [f'a photo of {i} red circles and a blue square on the grass' for i in range(batch)]
    tokens = pgseg.tokenize(captions, context_length)
    return pgseg.data.text.trim_padding(tokens) if trim else tokens


def measure_train_step(args) -> dict:
    import pgseg
    import pgseg.losses.contrastive
    import pgseg.losses.grouping
    import pgseg.models.npr
    from pgseg.losses.objective import build_objective
    from pgseg.models import matching
    from pgseg.runtime.cpu_memory import configure_cpu_memory
    from pgseg.runtime.distributed import get_rank, get_world_size, init_distributed

    device, _ = init_distributed() if 'RANK' in os.environ else (torch.device(args.device), 0)
    torch.manual_seed(0)
    cfg = pgseg.load_config(args.config).model
    if args.npr_variant:
        cfg.npr.variant = args.npr_variant
    cfg.image.grad_checkpointing = args.grad_checkpointing
    if args.attention:
        cfg.attention = args.attention
    model = pgseg.build_model(cfg).to(device).train()
    if device.type == 'cuda' and get_world_size() > 1:
        model.convert_sync_batchnorm()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    size = cfg.image.img_size
    images = torch.randn(args.batch, 3, size, size, device=device)
    tokens = _caption_tokens(args.batch, cfg.text.context_length, trim=not args.full_context).to(device)
    dtype = {'fp32': None, 'bf16': torch.bfloat16}[args.precision]
    objective = build_objective(model)
    if args.compile:
        objective.compile_losses()  # what train.compile does

    em_timer = _Timer(pgseg.models.npr.em_prototypes, device)
    pgseg.models.npr.em_prototypes = em_timer
    gather_timer = _Timer(pgseg.losses.contrastive.all_gather_with_grad, device)
    pgseg.losses.contrastive.all_gather_with_grad = gather_timer
    pgseg.losses.grouping.all_gather_with_grad = gather_timer

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            losses, updates = objective(images, tokens)
        losses['loss'].backward()
        objective.apply_updates(updates)  # as the trainer: the prototype momentum after the backward pass
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return losses

    warmup_faults, warmup_s = [], []
    for i in range(args.warmup + (args.warmup_extra if device.type == 'cpu' else 0)):
        faults = _minor_faults()
        t0 = time.perf_counter()
        step()
        _sync(device)
        warmup_s.append(time.perf_counter() - t0)  # the first one includes torch.compile's compilation
        warmup_faults.append(_minor_faults() - faults)
        # on the CPU the heap grows for a few steps until freed blocks fit every request (pgseg.runtime.cpu_memory);
        # memory touched for the first time is slow on some machines, so time the steps a long run sees: after the
        # growth
        # every rank must run the same number of steps (the losses gather across ranks): the most faults decides
        faults_all = warmup_faults[-1]
        if get_world_size() > 1:
            flag = torch.tensor([faults_all], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            faults_all = int(flag)
        if i + 1 >= args.warmup and faults_all < 100:
            break
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    with_npr, without_npr, em, gathers, match_wait, beside = [], [], [], [], [], []
    for i in range(args.steps):
        # with and without NPR in adjacent pairs, the order alternating, so that drift cancels in the paired differences
        pair = (True, False) if i % 2 == 0 else (False, True)
        for enabled in (pair if cfg.arch == 'pgseg' and not args.compile else (True,)):
            _set_npr(objective, enabled)
            em_timer.total = gather_timer.total = 0.0
            # inside a compiled graph the timers' synchronisation would break the graph (and switching them on would
            # recompile it): under --compile the step is timed whole
            em_timer.active = gather_timer.active = enabled and not args.compile
            matching.MATCH_STATS.reset()
            _sync(device)
            t0 = time.perf_counter()
            losses = step()
            _sync(device)
            elapsed = time.perf_counter() - t0
            em_timer.active = gather_timer.active = False
            if enabled:
                with_npr.append(elapsed)
                em.append(em_timer.total)
                gathers.append(gather_timer.total)
                match_wait.append(matching.MATCH_STATS.wait_s)
                beside.append(_ceiling_probe(device, 8192 if device.type == 'cuda' else 2048))
            else:
                without_npr.append(elapsed)
    _set_npr(objective, True)
    step_s = statistics.median(with_npr)
    profile = None
    if args.profile:  # after the timed steps, so the profiler's own cost stays out of the timings
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
        _sync(device)
        t0 = time.perf_counter()
        with torch_profile(activities=activities) as prof:
            for _ in range(args.profile):
                step()
            _sync(device)
        profile = profile_families(prof, args.profile)
        profile['wall_s_per_step_profiled'] = (time.perf_counter() - t0) / args.profile

    # the peak of the timed and profiled steps; the FLOP count's step below runs the matmul attention kernel, which
    # holds every attention matrix, and would raise it for runs timed with the fused kernel
    if device.type == 'cuda':
        peak_mb, peak_kind = torch.cuda.max_memory_allocated() / 2**20, 'cuda max_memory_allocated'
    else:
        peak_mb, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'process peak RSS'
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    # the model's FLOPs whichever kernel the timed steps ran: under the matmul kernel attention's products reach the
    # counter (torch.utils.flop_counter has no formula for the CPU flash kernel and would count its attention as 0)
    # (compiled steps keep their kernel: switching it would recompile the losses)
    attention, model.attention = model.attention, (model.attention if args.compile else 'math')
    with counter:
        step()
    model.attention = attention
    flops = counter.get_total_flops()
    result = {
        'precision': args.precision, 'batch': args.batch, 'device': str(device), 'world_size': get_world_size(),
        'npr_variant': cfg.npr.variant, 'grad_checkpointing': args.grad_checkpointing, 'compile': args.compile,
        'attention': cfg.attention, 'malloc': os.environ.get('PGSEG_CPU_MALLOC'),
        'cpu_memory': configure_cpu_memory() if device.type == 'cpu' else None,
        'text_tokens': tokens.shape[-1], 'warmup_steps': len(warmup_faults), 'warmup_page_faults': warmup_faults,
        'warmup_step_s': warmup_s,
        'threads': torch.get_num_threads(), 'params': sum(p.numel() for p in model.parameters()),
        'step_s_median': step_s, 'step_s_all': with_npr, 'images_per_s': args.batch / step_s,
        # the ceiling probed right after each timed step: the fraction of the step's rate paired with it
        'ceiling_beside_steps_gflops': beside,
        'fraction_of_ceiling_beside': _fraction_beside(flops, with_npr, beside),
        'flops_per_step': flops, 'achieved_gflops': flops / step_s / 1e9,
        'step_without_npr_s_median': statistics.median(without_npr) if without_npr else None,
        'step_without_npr_s_all': without_npr,
        # the median of the paired differences: the machine's drift between pairs does not enter
        'npr_share': (statistics.median(a - b for a, b in zip(with_npr, without_npr)) / step_s
                      if without_npr else None),
        'em_forward_share': None if args.compile else statistics.median(em) / step_s,
        'gather_share': None if args.compile else statistics.median(gathers) / step_s,
        'match_wait_share': None if args.compile else statistics.median(match_wait) / step_s,
        'peak_memory_mb': peak_mb, 'peak_memory_kind': peak_kind,
        'final_losses': {k: float(v.detach()) for k, v in losses.items()},
        'profile': profile,
    }
    return result if get_rank() == 0 else {}


def mode_train(args, peak: dict | None = None) -> dict:
    device = torch.device(args.device)
    peak = peak or measure_peak(device)
    precisions = args.precisions
    if precisions is None:  # bf16 only where it is native: emulated, one step of the paper model takes half an hour
        precisions = ['fp32', 'bf16'] if peak['bf16_native'] else ['fp32']
        if not peak['bf16_native']:
            print(f"train: bf16 left out: no native bf16 on {device.type} (bf16 matmul "
                  f"{peak['matmul_gflops']['bf16']:.1f} GFLOP/s against {peak['matmul_gflops']['fp32']:.0f} in fp32); "
                  f"--precisions fp32 bf16 runs it anyway")
    results = []
    compiled = {'off': (False,), 'on': (True,), 'both': (False, True)}[args.compile]
    checkpointed = {'off': (False,), 'on': (True,), 'both': (False, True)}[args.grad_checkpointing]
    kernels = args.attention or [None]  # None: the config's (auto)
    for precision, compile_, ckpt, kernel in ((p, c, g, a) for p in precisions for c in compiled for g in checkpointed
                                              for a in kernels):
        cmd = [__file__, '_step', '--config', args.config, '--batch', str(args.batch), '--steps', str(args.steps),
               '--warmup', str(args.warmup), '--warmup-extra', str(args.warmup_extra), '--precision', precision,
               '--device', args.device, '--malloc', args.malloc]
        cmd += (['--npr-variant', args.npr_variant] if args.npr_variant else [])
        cmd += (['--grad-checkpointing'] if ckpt else []) + (['--compile'] if compile_ else [])
        cmd += ['--full-context'] if args.full_context else []
        cmd += ['--attention', kernel] if kernel else []
        cmd += ['--profile', str(args.profile)] if args.profile else []
        if args.nproc > 1:
            cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(args.nproc)] + cmd
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // args.nproc)))
        else:
            cmd, env = [sys.executable] + cmd, None
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        rows = [json.loads(line) for line in out.strip().splitlines() if line.startswith('{') and line != '{}']
        results.append(rows[-1])
    # a compiled step's FLOPs were counted under its own kernel (switching it would recompile the losses): take the
    # eager run's count of the same step where it ran, so every kernel is credited the model's FLOPs
    for r in results:
        eager = next((e for e in results if not e['compile'] and all(
            e[k] == r[k] for k in ('precision', 'grad_checkpointing', 'attention'))), None)
        if r['compile'] and eager is not None:
            r['flops_per_step'], r['achieved_gflops'] = eager['flops_per_step'], eager['flops_per_step'] / r[
                'step_s_median'] / 1e9
            r['fraction_of_ceiling_beside'] = _fraction_beside(r['flops_per_step'], r['step_s_all'],
                                                               r['ceiling_beside_steps_gflops'])
    # the ceiling again after the steps (shared machines drift): fractions are taken against the higher one
    after = measure_peak(device)
    kind = peak['ceiling_precision']  # bf16, or fp32 where bf16 is emulated
    ceiling = max(peak['ceiling_gflops'], after['ceiling_gflops'])
    first = results[0]
    print(f"\ntrain: {os.path.basename(args.config)}, {first['params']:,} parameters, batch {args.batch} per process x "
          f"{first['world_size']}, NPR {first['npr_variant']}, activation checkpointing "
          f"{args.grad_checkpointing}, attention {first['attention']}, torch.compile "
          f"{args.compile}, {first['threads']} threads, "
          f"torch {torch.__version__}\n"
          f"captions of {first['text_tokens']} tokens ({'full context' if args.full_context else 'padding trimmed'})")
    print(f"ceilings measured in this run, before / after the steps: matmul bf16 {peak['matmul_gflops']['bf16']:.0f} / "
          f"{after['matmul_gflops']['bf16']:.0f} GFLOP/s{'' if kind == 'bf16' else ' (emulated)'}, fp32 "
          f"{peak['matmul_gflops']['fp32']:.0f} / {after['matmul_gflops']['fp32']:.0f} GFLOP/s; fractions of the "
          f"{kind} ceiling, {ceiling:.0f}; "
          f"{first['flops_per_step'] / 1e9:.1f} GFLOP per step; CPU malloc: {args.malloc}\n")
    head = (f"{'precision':<19}{'step s':>8}{'img/s':>8}{'GFLOP/s':>9}{'of ' + kind:>9}{'NPR':>7}{'EM fwd':>8}"
            f"{'gather':>8}{'peak MB':>9}")
    print(head)
    print('-' * len(head))
    def share(x):
        return '-' if x is None else f'{100 * x:.1f}%'

    for r in results:
        r['fraction_of_ceiling'], r['ceiling_precision'] = r['achieved_gflops'] / ceiling, kind
        print(f"{_label(r):<19}{r['step_s_median']:>8.3f}{r['images_per_s']:>8.2f}{r['achieved_gflops']:>9.1f}"
              f"{100 * r['fraction_of_ceiling']:>8.1f}%{share(r['npr_share']):>7}{share(r['em_forward_share']):>8}"
              f"{share(r['gather_share']):>8}{r['peak_memory_mb']:>9.0f}")
    by = {(r['precision'], r['compile'], r['grad_checkpointing']): r for r in results
          if r['attention'] == results[0]['attention']}  # the comparisons below: of the first kernel
    g0 = checkpointed[0]  # the comparisons below are of runs without activation checkpointing where they ran
    speedup = None
    for c in compiled:
        if ('fp32', c, g0) in by and ('bf16', c, g0) in by:
            ratio = by[('fp32', c, g0)]['step_s_median'] / by[('bf16', c, g0)]['step_s_median']
            speedup = speedup or ratio  # the JSON's bf16_speedup: eager where eager ran
            print(f"\nbf16 / fp32 speed-up{' (compiled)' if c else ''}: {ratio:.2f}x")
    compile_speedups = {p: by[(p, False, g0)]['step_s_median'] / by[(p, True, g0)]['step_s_median']
                        for p in precisions if (p, False, g0) in by and (p, True, g0) in by}
    for p, ratio in compile_speedups.items():
        print(f"torch.compile, {p}: {ratio:.2f}x eager (compilation and first step: "
              f"{by[(p, True, g0)]['warmup_step_s'][0]:.0f} s, against {by[(p, False, g0)]['warmup_step_s'][0]:.0f} s "
              'eager)')
    c0 = compiled[0]
    checkpointing = {}  # activation checkpointing against none, per precision: peak memory and step time ratios
    for p in precisions:
        if (p, c0, False) in by and (p, c0, True) in by:
            on, off = by[(p, c0, True)], by[(p, c0, False)]
            checkpointing[p] = {'peak_memory_ratio': on['peak_memory_mb'] / off['peak_memory_mb'],
                                'step_time_ratio': on['step_s_median'] / off['step_s_median']}
    for p, e in checkpointing.items():
        print(f"activation checkpointing, {p}: peak memory {100 * (e['peak_memory_ratio'] - 1):+.0f}%, step time "
              f"{100 * (e['step_time_ratio'] - 1):+.0f}%")
    if args.compile != 'off':
        print('  (compiled steps are timed whole: NPR, EM and gather shares are measured eager only)')
    print(f'of the ceiling probed beside each step (a {kind} matmul right after it; the median of the steps\' '
          'fractions): ' +
          ', '.join(f"{_label(r)} {100 * r['fraction_of_ceiling_beside']:.1f}% (probes "
                    f"{min(r['ceiling_beside_steps_gflops']):.0f}-{max(r['ceiling_beside_steps_gflops']):.0f} GFLOP/s)"
                    for r in results))
    for r in results:
        if r.get('profile'):
            prof = r['profile']
            print(f"\nprofile, {_label(r)}: aten self time {prof['aten_self_s_per_step']:.3f} s per step (profiled "
                  f"wall {prof['wall_s_per_step_profiled']:.3f} s; timed {r['step_s_median']:.3f} s)")
            for name, f in prof['families'].items():
                print(f"  {name:<24}{f['s_per_step']:>8.3f} s{100 * f['share']:>7.1f}%")
            print('  costliest: ' + ', '.join(f"{o['op']} {o['s_per_step']:.3f} s" for o in prof['top_ops'][:5]))
    print('warm-up: ' + ', '.join(f"{_label(r)} {r['warmup_steps']} steps (page faults per step: "
                                  f"{' '.join(map(str, r['warmup_page_faults']))})" for r in results))
    return {'mode': 'train', **machine_info(device), 'peak': peak, 'peak_after': after,
            'ceiling_precision': kind, 'ceiling_gflops': ceiling,
            'malloc': args.malloc, 'config': args.config, 'results': results,
            'bf16_speedup': speedup, 'compile_speedups': compile_speedups, 'checkpointing': checkpointing}


def _label(result: dict) -> str:
    return result['precision'] + _variant(result)


def _variant(result: dict) -> str:
    """What sets a step apart beside its precision: compiled, activation checkpointing, an attention kernel named."""
    return ((' compiled' if result['compile'] else '') + (' ckpt' if result['grad_checkpointing'] else '')
            + (f" {result['attention']}" if result.get('attention', 'auto') != 'auto' else ''))


# ---------------------------------------------------------------------------------------------------------- eval
class TwoPass(torch.nn.Module):
    """The released evaluation's cost: the image encoder runs once for the group maps and once more for the
    embeddings of every crop. Same outputs as one pass; for the benchmark's comparison only."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.logit_scale = model.logit_scale

    def encode_image(self, images, with_group_embeds: bool = True):
        maps = self.model.encode_image(images, with_group_embeds=False)
        out = self.model.encode_image(images, with_group_embeds=with_group_embeds)
        out.group_maps = maps.group_maps
        return out


def mode_eval(args) -> dict:
    import pgseg
    from pgseg.eval.classes import COCO_STUFF
    from pgseg.eval.inference import predict_labels, window_slices
    from pgseg.eval.protocols import get_protocol
    from pgseg.eval.templates import get_templates
    from pgseg.runtime.precision import native_bf16, resolve_precision

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = pgseg.build_model(pgseg.load_config(args.config).model).to(device).eval()
    if args.precision == 'both':  # fp32, and bf16 where it is native (emulated, it would take hours)
        precisions = ['fp32', 'bf16'] if native_bf16(device) else ['fp32']
    else:
        precisions = [resolve_precision(args.precision, device, '--precision', gpu_fallback='fp32')]
    protocol = get_protocol('pgseg')
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (375, 500, 3), dtype=np.uint8) for _ in range(args.images)]
    scale = protocol.short_side / 375
    h, w = int(375 * scale + 0.5), int(500 * scale + 0.5)
    crops_per_image = len(window_slices(h, protocol.crop_size, protocol.stride)) * \
        len(window_slices(w, protocol.crop_size, protocol.stride))
    templates = get_templates('full')
    kinds = {'one_pass': model, 'two_pass': TwoPass(model)}
    names = ['one_pass', 'two_pass'] if args.two_pass in ('compare', 'on') else ['one_pass']
    by_precision = {}
    for precision in precisions:
        dtype = torch.bfloat16 if precision == 'bf16' else None
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            _sync(device)
            t0 = time.perf_counter()
            class_embeds = model.class_embeddings(list(COCO_STUFF), templates).to(device)
            _sync(device)
            text_s = time.perf_counter() - t0
        voc_embeds = class_embeds[:20]
        for name in names:
            predict_labels(kinds[name], images[0], voc_embeds, 0.95, True, protocol, device, dtype)  # warm-up
        seconds = dict.fromkeys(names, 0.0)
        for i, img in enumerate(images):  # image by image, the order alternating, so that drift hits both alike
            for name in (names if i % 2 == 0 else names[::-1]):
                _sync(device)
                t0 = time.perf_counter()
                predict_labels(kinds[name], img, voc_embeds, 0.95, True, protocol, device, dtype)
                _sync(device)
                seconds[name] += time.perf_counter() - t0
        results = {name: {'seconds': s, 'images_per_s': len(images) / s,
                          'crops_per_s': len(images) * crops_per_image / s} for name, s in seconds.items()}
        ratio = (results['one_pass']['crops_per_s'] / results['two_pass']['crops_per_s']
                 if 'two_pass' in results else None)
        by_precision[precision] = {'results': results, 'one_vs_two_pass': ratio, 'text_embedding_s': text_s}
    print(f"\neval: {os.path.basename(args.config)}, protocol {protocol.describe()}, {len(images)} images of 500x375 "
          f"({crops_per_image} crops each at short side {protocol.short_side})\n")
    print(f"{'':<18}{'crops/s':>10}{'images/s':>10}{'one / two passes':>18}{'text s':>8}")
    for precision, r in by_precision.items():
        for name, t in r['results'].items():
            ratio = f"{r['one_vs_two_pass']:.2f}x" if name == 'one_pass' and r['one_vs_two_pass'] else ''
            text = f"{r['text_embedding_s']:.2f}" if name == 'one_pass' else ''
            print(f"{precision + ' ' + name:<18}{t['crops_per_s']:>10.3f}{t['images_per_s']:>10.3f}{ratio:>18}"
                  f"{text:>8}")
    print(f'(text s: the text embeddings of {len(COCO_STUFF)} classes x {len(templates)} templates)')
    return {'mode': 'eval', **machine_info(device), 'config': args.config, 'protocol': protocol.describe(),
            'num_images': len(images), 'crops_per_image': crops_per_image, 'by_precision': by_precision,
            'text_prompts': len(COCO_STUFF) * len(templates)}


# ---------------------------------------------------------------------------------------------------------- data
def _write_jpeg_shards(folder: str, num: int, size: int = 512, per_shard: int = 48) -> str:
    """img2dataset-like shards of ``size``-pixel synthetic JPEGs (cached in ``folder``); returns the brace pattern."""
    from pgseg.data.synthetic.scenes import SceneConfig
    from pgseg.data.synthetic.writers import write_caption_shards
    if not os.path.isfile(os.path.join(folder, 'sizes.json')):
        write_caption_shards(folder, num, seed=7, samples_per_shard=per_shard, scene=SceneConfig(size=size),
                             progress=False)
    shards = (num + per_shard - 1) // per_shard
    return os.path.join(folder, f'{{00000..{shards - 1:05d}}}.tar')


IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp')
CAPTION_SUFFIXES = ('.txt', '.text')


def _shard_images(pattern: str, limit: int) -> tuple[list[bytes], int]:
    """The image members of the tar shards a brace pattern names (``::`` separates patterns), at most ``limit``, and
    the number of caption members (``.txt`` / ``.text``) read on the way (the training loader needs them)."""
    import tarfile

    import braceexpand
    paths = [p for part in pattern.split('::') for p in braceexpand.braceexpand(part)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f'data --shards {pattern!r}: {len(missing)} of {len(paths)} shards do not exist '
                         f'(first: {missing[0]})')
    blobs: list[bytes] = []
    captions = 0
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                name = member.name.lower()
                if member.isfile() and name.endswith(CAPTION_SUFFIXES):
                    captions += 1
                if member.isfile() and name.endswith(IMAGE_SUFFIXES):
                    blobs.append(tar.extractfile(member).read())
                    if len(blobs) >= limit:
                        return blobs, captions
    if not blobs:
        raise SystemExit(f'data --shards {pattern!r}: no {"/".join(IMAGE_SUFFIXES)} members in {len(paths)} shards')
    return blobs, captions


def _best_rates(jobs: dict, blobs: list[bytes], repeats: int) -> dict[str, float]:
    """Images/s of each job (a function over all of ``blobs``), the best of ``repeats`` rounds. The jobs take turns
    within each round, so that the machine's drift hits them alike."""
    rates: dict[str, float] = {}
    for _ in range(repeats):
        for name, job in jobs.items():
            t0 = time.perf_counter()
            job(blobs)
            rates[name] = max(rates.get(name, 0.0), len(blobs) / (time.perf_counter() - t0))
    return rates


def _released_transform_job():
    """The released code's training transform, for the comparison: torchvision on a PIL image converted to RGB (as
    webdataset's ``pil`` decoder gives it), normalised to float in the worker."""
    from PIL import Image
    from torchvision import transforms as T

    from pgseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    transform = T.Compose([T.RandomResizedCrop(224, scale=(0.08, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def run(batch):
        torch.manual_seed(0)
        for b in batch:
            transform(Image.open(io.BytesIO(b)).convert('RGB'))
    return run


def mode_data(args) -> dict:
    """Decode + augmentation per worker (one thread), plain and draft, against the decoder's own limits."""
    from PIL import Image

    from pgseg.data.text import CaptionTokenizer
    from pgseg.data.transforms import TrainTransform, resize_uint8, to_rgb
    from pgseg.data.webdataset import TrainStream, build_train_loader, expand_source

    if args.shards:
        pattern, source_text = args.shards, args.shards
        blobs, captions = _shard_images(args.shards, args.images)
    else:
        folder = os.path.join(args.out_dir, f'jpeg{args.size}_{args.images}')
        pattern = _write_jpeg_shards(folder, args.images, args.size)
        source_text = f'synthetic {args.size}x{args.size} JPEGs in img2dataset shards ({folder})'
        blobs, captions = _shard_images(pattern, args.images)
    torch.set_num_threads(1)  # a data worker's setting
    sizes = [Image.open(io.BytesIO(b)).size for b in blobs]
    bits_per_pixel = 8 * sum(map(len, blobs)) / sum(w * h for w, h in sizes)

    def pipeline(transform):
        def run(batch):
            rng = random.Random(0)
            for b in batch:
                transform(b, rng)
        return run

    def decode(reduction):  # reduction: (w, h) -> the draft request, or None for full size
        def run(batch):
            for b in batch:
                img = Image.open(io.BytesIO(b))
                if reduction is not None and img.format == 'JPEG':
                    img.draft('RGB', reduction(img.size))
                to_rgb(img).load()
        return run

    pipelines = {'official_pgseg': ('official_pgseg', (0.08, 1.0)),
                 'official_pgseg_large': ('official_pgseg', (0.8, 1.0)), 'none': ('none', (0.08, 1.0))}
    jobs = {f"{name}_{'draft' if draft else 'plain'}": pipeline(TrainTransform(224, augment, scale, use_draft=draft))
            for name, (augment, scale) in pipelines.items() for draft in (False, True)}
    jobs['released'] = _released_transform_job()
    jobs['decode_full'] = decode(None)
    jobs['decode_draft_224'] = decode(lambda wh: (224, 224) if min(wh) >= 448 else wh)  # what augment none asks
    jobs['decode_eighth'] = decode(lambda wh: (max(1, wh[0] // 8), max(1, wh[1] // 8)))  # the entropy-decoding floor
    rates = _best_rates(jobs, blobs, args.repeats)

    # the resize alone, on decoded images: Pillow's bilinear against the torch kernel the transforms use
    decoded = [to_rgb(Image.open(io.BytesIO(b))) for b in blobs[:32]]
    for im in decoded:
        im.load()  # decoded before the rounds, so that the first round of each resize does not decode
    resize_rates = _best_rates({'pillow': lambda imgs: [im.resize((224, 224), Image.BILINEAR) for im in imgs],
                                'torch_uint8': lambda imgs: [resize_uint8(im, (224, 224)) for im in imgs]},
                               decoded, args.repeats)

    first_batch_s = None
    if captions:  # the training loader skips (and counts) samples without a caption: none would ever make a batch
        source = expand_source('bench', pattern, len(blobs) if args.shards else None, 1.0)
        stream = TrainStream([source], TrainTransform(224, 'official_pgseg'), CaptionTokenizer(77), batch_size=64,
                             steps_per_epoch=2, seed=0, num_workers=2, shuffle_buffer=64, resampled=True)
        t0 = time.perf_counter()
        next(iter(build_train_loader(stream, 2)))
        first_batch_s = time.perf_counter() - t0

    speedups = {a: rates[f'{a}_draft'] / rates[f'{a}_plain'] for a in pipelines}
    bound = rates['decode_eighth'] / rates['decode_full']
    print(f'\ndata: {len(blobs)} images ({source_text}), {bits_per_pixel:.2f} bits/pixel; decode + augmentation to '
          f'224, one thread (a worker), images/s, best of {args.repeats} rounds\n')
    print(f"{'pipeline':<50}{'plain':>8}{'draft':>8}{'ratio':>8}{'of decode':>11}")
    labels = {'official_pgseg': 'official_pgseg (random crop, scale 0.08-1)',
              'official_pgseg_large': 'official_pgseg, large crops only (scale 0.8-1)',
              'none': 'resize whole image (augment none)'}
    for a, label in labels.items():
        print(f"{label:<50}{rates[a + '_plain']:>8.1f}{rates[a + '_draft']:>8.1f}{speedups[a]:>7.2f}x"
              f"{rates[a + '_plain'] / rates['decode_full']:>10.0%}")
    print('  (of decode: plain pipeline / full-size decode alone, the ceiling of a pipeline that decodes everything)')
    released = rates['official_pgseg_draft'] / rates['released']
    print(f"the released code's transform (torchvision on PIL, float normalisation in the worker): "
          f"{rates['released']:.1f} img/s; pgseg's official_pgseg with draft: {released:.2f}x")
    print(f"\n{'decode alone':<50}{'img/s':>8}")
    print(f"{'full size':<50}{rates['decode_full']:>8.1f}")
    print(f"{'draft to 224 (what the whole-image draft decodes)':<50}{rates['decode_draft_224']:>8.1f}")
    print(f"{'1/8 scale (entropy decoding only: the floor)':<50}{rates['decode_eighth']:>8.1f}")
    print(f'no DCT-domain reduction decodes these images more than {bound:.2f}x faster than full size: the Huffman '
          f'decoding of every coefficient stays')
    gain = resize_rates['torch_uint8'] / resize_rates['pillow']
    print(f"\nresize to 224 alone (the first {len(decoded)} images): Pillow bilinear {resize_rates['pillow']:.0f}/s, "
          f"torch uint8 (the transforms') {resize_rates['torch_uint8']:.0f}/s, {gain:.2f}x")
    if first_batch_s is None:
        print(f'time to first batch: not measured, the shards have no {"/".join(CAPTION_SUFFIXES)} captions')
    else:
        print(f'time to first batch (64 images, 2 workers): {first_batch_s:.2f} s')
    return {'mode': 'data', **machine_info(torch.device('cpu')), 'source': source_text, 'images': len(blobs),
            'bits_per_pixel': bits_per_pixel, 'rates': rates, 'draft_speedup': speedups['official_pgseg'],
            'draft_speedups': speedups, 'draft_decode_bound': bound, 'vs_released': released,
            'resize_rates': resize_rates, 'first_batch_s': first_batch_s}


# ---------------------------------------------------------------------------------------------------------- accuracy
def mode_accuracy(args) -> dict:
    """One training step of the model in bf16 with each attention kernel against the same step in fp32: the same
    weights, batch and random draws (Gumbel noise, drop paths). Each loss's difference, and the gradients' relative
    error (over all parameters, and the median and 90th percentile over the parameter tensors) and cosine
    similarity. The bound a faster bf16 path is held to: its deviation from fp32 against the float32-logit kernel's
    and the flash kernel's (docs/performance.md#attention-on-the-cpu)."""
    import pgseg
    from pgseg.losses.objective import build_objective

    device = torch.device(args.device)
    cfg = pgseg.load_config(args.config).model
    torch.manual_seed(0)
    model = pgseg.build_model(cfg).to(device).train()
    objective = build_objective(model)
    size = cfg.image.img_size
    images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    tokens = _caption_tokens(args.batch, cfg.text.context_length).to(device)

    def run(kernel: str, dtype):
        model.attention = kernel
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same Gumbel noise and drop paths in every run
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            losses, _ = objective(images, tokens)
        losses['loss'].backward()
        grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}
        return {k: float(v.detach()) for k, v in losses.items()}, grads

    ref_losses, ref_grads = run('math', None)  # fp32: every kernel computes in float32 there
    flat_ref = torch.cat([g.flatten() for g in ref_grads.values()])
    kernels = args.kernels
    rows = {}
    for kernel in kernels:
        losses, grads = run(kernel, torch.bfloat16)
        flat = torch.cat([grads[n].flatten() for n in ref_grads])
        per_tensor = [float((grads[n] - g).norm() / g.norm()) for n, g in ref_grads.items() if g.norm() > 0]
        rows[kernel] = {
            'loss_diff': {k: losses[k] - v for k, v in ref_losses.items()},
            'grad_rel_error': float((flat - flat_ref).norm() / flat_ref.norm()),
            'grad_cosine': float(torch.nn.functional.cosine_similarity(flat, flat_ref, dim=0)),
            'grad_rel_error_median_tensor': statistics.median(per_tensor),
            'grad_rel_error_p90_tensor': float(np.percentile(per_tensor, 90)),
        }
    print(f"\naccuracy: {os.path.basename(args.config)}, batch {args.batch}, one training step in bf16 against fp32 "
          f"(same weights, batch and random draws)\n")
    print(f"{'bf16 kernel':<12}{'|d loss|':>10}{'grad rel err':>14}{'cosine':>10}{'median tensor':>15}"
          f"{'p90 tensor':>12}")
    for kernel, r in rows.items():
        print(f"{kernel:<12}{abs(r['loss_diff']['loss']):>10.4f}{r['grad_rel_error']:>14.4f}{r['grad_cosine']:>10.5f}"
              f"{r['grad_rel_error_median_tensor']:>15.4f}{r['grad_rel_error_p90_tensor']:>12.4f}")
    print('per loss, bf16 minus fp32: ' + '; '.join(
        f"{kernel}: " + ', '.join(f'{k} {v:+.4f}' for k, v in r['loss_diff'].items()) for kernel, r in rows.items()))
    return {'mode': 'accuracy', **machine_info(device), 'config': args.config, 'batch': args.batch,
            'fp32_losses': ref_losses, 'kernels': rows}


# ---------------------------------------------------------------------------------------------------------- targets
# The performance targets (docs/performance.md#targets): the bf16 step's fraction of the bf16 ceiling by CPU class,
# the fp32 step's of the fp32 ceiling, one encoder pass per crop against two, the data worker against the released
# transform.
BF16_TARGET = {'AMX': 0.40, 'AVX-512 BF16': 0.60, 'AVX-512': 0.60}
FP32_TARGET = 0.75
ONE_PASS_TARGET = 1.8
DATA_TARGET = 1.5


def target_rows(peak: dict | None, train: dict | None, eval_: dict | None, data: dict | None,
                baseline: dict | None = None) -> list[dict]:
    """The targets' figures from the modes' results (any may be None: its rows are left out). Each row: ``target``,
    ``figure`` (text), ``value``, ``goal`` and ``met`` (None where the target has no threshold on this machine).
    ``baseline``: an earlier ``train`` result whose peak memory the run must not exceed."""
    rows = []

    def row(target, figure, value=None, goal=None, higher=True, unit='x'):
        met = None if goal is None or value is None else (value >= goal if higher else value <= goal)
        goal_text = None if goal is None else ('>= ' if higher else '<= ') + (
            f'{goal:.0%}' if unit == '%' else f'{goal:.0f} MB' if unit == 'MB' else f'{goal:.4g}x')
        rows.append({'target': target, 'figure': figure, 'value': value, 'goal': goal, 'goal_text': goal_text,
                     'met': met})

    if train:
        cls = train.get('cpu_class', 'unknown') if train['results'][0]['device'] == 'cpu' else 'GPU'
        fp32_ceiling = max(train['peak']['matmul_gflops']['fp32'], train['peak_after']['matmul_gflops']['fp32'])
        for r in train['results']:
            if r['grad_checkpointing']:
                continue
            label = _label(r)
            if r['precision'] == 'bf16' and train['ceiling_precision'] == 'bf16':
                row(f'bf16 step{_variant(r)}, fraction of the bf16 ceiling ({cls})',
                    f"{100 * r['fraction_of_ceiling']:.1f}% of {train['ceiling_gflops']:.0f} GFLOP/s "
                    f"({100 * r['fraction_of_ceiling_beside']:.1f}% of the probes beside the steps), "
                    f"{r['step_s_median']:.3f} s per step of {r['batch']}", r['fraction_of_ceiling'],
                    BF16_TARGET.get(cls), unit='%')
            elif r['precision'] == 'fp32':
                fraction = r['achieved_gflops'] / fp32_ceiling
                row(f'fp32 step{_variant(r)}, fraction of the fp32 ceiling',
                    f"{100 * fraction:.1f}% of {fp32_ceiling:.0f} GFLOP/s, {r['step_s_median']:.3f} s per step of "
                    f"{r['batch']}", fraction, FP32_TARGET, unit='%')
            old = next((b for b in (baseline or {}).get('results', []) if _label(b) == label
                        and b['batch'] == r['batch']), None)
            row(f'peak memory, {label}, batch {r["batch"]}',
                f"{r['peak_memory_mb']:.0f} MB ({r['peak_memory_kind']})"
                + (f", baseline {old['peak_memory_mb']:.0f} MB" if old else ''),
                r['peak_memory_mb'], old['peak_memory_mb'] if old else None, higher=False, unit='MB')
        for p, e in train.get('checkpointing', {}).items():
            row(f'activation checkpointing, {p}', f"peak memory {100 * (e['peak_memory_ratio'] - 1):+.0f}%, step "
                f"time {100 * (e['step_time_ratio'] - 1):+.0f}%")
        for p, ratio in train.get('compile_speedups', {}).items():
            row(f'torch.compile, {p}', f'{ratio:.2f}x eager ({"wins" if ratio > 1.05 else "does not win"})', ratio)
    if eval_:
        by_precision = eval_.get('by_precision') or {  # eval.json of one precision, as written before 2026-12-05
            eval_.get('precision', '?'): {'results': eval_['results'], 'one_vs_two_pass': eval_.get('one_vs_two_pass')}}
        for p, r in by_precision.items():
            one = r['results']['one_pass']['crops_per_s']
            ratio = r['one_vs_two_pass']
            row(f'evaluation, {p}, one encoder pass per crop',
                f'{one:.2f} crops/s' + (f', {ratio:.2f}x two passes' if ratio else ''), ratio,
                ONE_PASS_TARGET if ratio else None)
    if data:
        row('data worker (official_pgseg with draft) against the released transform',
            f"{data['rates']['official_pgseg_draft']:.1f} against {data['rates']['released']:.1f} img/s: "
            f"{data['vs_released']:.3f}x", data['vs_released'], DATA_TARGET)
    if peak and not rows:
        row('ceilings', f"bf16 {peak['matmul_gflops']['bf16']:.0f}, fp32 {peak['matmul_gflops']['fp32']:.0f} GFLOP/s")
    return rows


def print_targets(rows: list[dict], machine: str) -> None:
    print(f'\ntargets ({machine}):\n')
    width = max(len(r['target']) for r in rows) + 2
    for r in rows:
        verdict = {True: 'met', False: 'NOT MET', None: ''}[r['met']]
        print(f"{r['target']:<{width}}{r['figure']}" + (f"  [{r['goal_text']}: {verdict}]" if r['goal_text'] else ''))


def mode_targets(args) -> dict:
    """The targets' figures from the JSON files the other modes wrote to ``--out-dir``."""
    def load(mode):
        path = os.path.join(args.out_dir, f'{mode}.json')
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    found = {m: load(m) for m in ('peak', 'train', 'eval', 'data')}
    if not any(found.values()):
        raise SystemExit(f'targets: no peak/train/eval/data JSON in {args.out_dir}: run the modes first')
    baseline = None
    if args.baseline:
        with open(args.baseline) as f:
            baseline = json.load(f)
    rows = target_rows(found['peak'], found['train'], found['eval'], found['data'], baseline)
    first = next(v for v in found.values() if v)
    machine = f"{first.get('cpu_class', 'unknown')} CPU, {first['threads']} threads" if first['device'] == 'cpu' \
        else first.get('gpu', first['device'])
    print_targets(rows, machine)
    measured_on = {k: first[k] for k in ('machine', 'processor', 'cpu_count', 'cpu_class', 'threads', 'torch',
                                           'device', 'gpu') if k in first}  # the machine the figures come from
    return {'mode': 'targets', **measured_on, 'rows': rows, 'from': {m: bool(v) for m, v in found.items()}}


# ---------------------------------------------------------------------------------------------------------- main
def _write(result: dict, out_dir: str, mode: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f'{mode}.json')
    with open(path, 'w') as f:
        json.dump(result, f, indent=2)
    print(f'wrote {path}')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='mode', required=True)
    modes = {m: sub.add_parser(m) for m in ('peak', 'train', 'eval', 'data', 'all', 'targets', 'accuracy')}
    modes['model'] = sub.add_parser('model', help='the former name of train')
    step = sub.add_parser('_step', help=argparse.SUPPRESS)
    for p in list(modes.values()) + [step]:
        p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
        p.add_argument('--config', default='configs/pgseg_gcc_redcaps.yaml')
        p.add_argument('--out-dir', default='runs/benchmark')
        p.add_argument('--malloc', choices=['retain', 'system'], default='retain',
                       help="CPU: freed memory kept for reuse and large tensors on huge pages, as pgseg's commands do "
                            "(retain, pgseg.runtime.cpu_memory), or the system's defaults (system), for the comparison")
    for p in (modes['train'], modes['model'], modes['all'], step):
        p.add_argument('--batch', type=int, default=64)
        p.add_argument('--steps', type=int, default=3)
        p.add_argument('--warmup', type=int, default=2, help='warm-up steps before the timed ones, at least')
        p.add_argument('--warmup-extra', type=int, default=8,
                       help='CPU: up to this many more, until a step no longer grows the heap (fewer than 100 page '
                            'faults)')
        p.add_argument('--npr-variant', choices=['reference', 'paper'], default=None)
        if p is step:
            p.add_argument('--grad-checkpointing', action='store_true', help='activation checkpointing of every block')
            p.add_argument('--compile', action='store_true', help='torch.compile the model')
        else:
            p.add_argument('--grad-checkpointing', nargs='?', const='on', default='off', choices=['off', 'on', 'both'],
                           help='activation checkpointing of every block (--grad-checkpointing: on), or each '
                                'precision with and without it side by side (both: the memory saved, the time paid)')
            p.add_argument('--compile', nargs='?', const='on', default='off', choices=['off', 'on', 'both'],
                           help='torch.compile the model (--compile: on), or time each precision eager and compiled '
                                'side by side (both)')
        p.add_argument('--nproc', type=int, default=1, help='processes (torchrun, gloo on the CPU)')
        p.add_argument('--precisions', nargs='+', default=None, choices=['fp32', 'bf16'],
                       help='default: fp32, and bf16 where the device has native bf16')
        kernels = ['auto', 'math', 'shifted', 'fused']
        if p is step:
            p.add_argument('--attention', choices=kernels, default=None)
        else:
            p.add_argument('--attention', nargs='+', choices=kernels, default=None,
                           help="model.attention for the step (default: the config's, 'auto'); several: each side by "
                                'side')
        p.add_argument('--profile', type=int, default=0, metavar='STEPS',
                       help='after the timed steps, profile this many more (torch.profiler): self time per step by '
                            'operator family and the costliest operators, printed and in train.json')
        p.add_argument('--full-context', action='store_true',
                       help="keep the captions' padding to the context length (the released trainer's cost); by "
                            'default the padding after the last EOT is cut, as pgseg-train does')
    step.add_argument('--precision', choices=['fp32', 'bf16'], default='fp32')
    for p in (modes['eval'], modes['all']):
        p.add_argument('--images', type=int, default=10)
        p.add_argument('--precision', choices=['auto', 'fp32', 'bf16', 'both'], default='both',
                       help='both: fp32, and bf16 where it is native; auto: bf16 where native, else fp32 '
                            '(pgseg.runtime.precision)')
        p.add_argument('--two-pass', choices=['compare', 'on', 'off'], default='compare',
                       help='also run the two-pass evaluation for the ratio (compare), or not (off)')
    modes['data'].add_argument('--images', type=int, default=96, help='images to time (synthetic, or the first of '
                               '--shards)')
    for p in (modes['data'], modes['all']):
        p.add_argument('--shards', default=None, help='time your own tar shards (a brace pattern, :: between '
                       'several) instead of synthetic JPEGs')
        p.add_argument('--size', type=int, default=512, help="the synthetic JPEGs' side (img2dataset's image_size)")
    for p in (modes['data'], modes['all']):
        p.add_argument('--repeats', type=int, default=5)
    modes['accuracy'].add_argument('--batch', type=int, default=8)
    modes['accuracy'].add_argument('--kernels', nargs='+', default=['math', 'shifted', 'fused'],
                                   choices=['math', 'shifted', 'fused'], help='the bf16 attention kernels to compare')
    for p in (modes['targets'], modes['all']):
        p.add_argument('--baseline', default=None, help="an earlier train.json whose peak memory per precision (at the "
                       'same batch) the run must not exceed')
    # all: the targets' settings (docs/performance.md#targets): batch 32, the profile, activation checkpointing side by
    # side
    modes['all'].set_defaults(batch=32, profile=2, grad_checkpointing='both')
    args = parser.parse_args(argv)
    from pgseg.runtime.cpu_memory import ENV_VAR, configure_cpu_memory
    os.environ[ENV_VAR] = args.malloc  # also for the train mode's child processes
    if args.device == 'cpu':
        configure_cpu_memory()
    if args.mode == '_step':
        print(json.dumps(measure_train_step(args)))
        return 0
    if args.mode == 'all':
        peak = mode_peak(args)
        _write(peak, args.out_dir, 'peak')
        _write(mode_train(args, peak), args.out_dir, 'train')
        _write(mode_eval(args), args.out_dir, 'eval')
        args.images = 96
        _write(mode_data(args), args.out_dir, 'data')
        _write(mode_targets(args), args.out_dir, 'targets')
        return 0
    mode = 'train' if args.mode == 'model' else args.mode
    result = {'peak': mode_peak, 'train': mode_train, 'eval': mode_eval, 'data': mode_data,
              'targets': mode_targets, 'accuracy': mode_accuracy}[mode](args)
    _write(result, args.out_dir, mode)
    return 0


if __name__ == '__main__':
    sys.exit(main())
