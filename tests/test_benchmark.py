"""The benchmark's targets report (scripts/benchmark.py): which ceiling each step is held to, by CPU class."""
import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope='module')
def bench():
    spec = importlib.util.spec_from_file_location('pgseg_benchmark',
                                                  os.path.join(HERE, '..', 'scripts', 'benchmark.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_class_from_flags(bench):
    assert bench.cpu_class({'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile'}) == 'AMX'
    assert bench.cpu_class({'avx2', 'avx512f', 'avx512_bf16'}) == 'AVX-512 BF16'
    assert bench.cpu_class({'avx2', 'avx512f'}) == 'AVX-512'
    assert bench.cpu_class({'avx2', 'fma'}) == 'AVX2'
    assert bench.cpu_class(set()) == 'unknown'


def _step(precision, gflops, *, compile_=False, ckpt=False, memory=4000.0, batch=32):
    return {'precision': precision, 'compile': compile_, 'grad_checkpointing': ckpt, 'device': 'cpu', 'batch': batch,
            'achieved_gflops': gflops, 'fraction_of_ceiling': gflops / 2000.0, 'fraction_of_ceiling_beside': 0.5,
            'step_s_median': 1.0, 'peak_memory_mb': memory, 'peak_memory_kind': 'process peak RSS'}


def _train(cpu_class, results, **extra):
    return {'cpu_class': cpu_class, 'ceiling_precision': 'bf16', 'ceiling_gflops': 2000.0,
            'peak': {'matmul_gflops': {'fp32': 300.0, 'bf16': 1900.0}},
            'peak_after': {'matmul_gflops': {'fp32': 320.0, 'bf16': 2000.0}}, 'results': results, **extra}


def test_each_precision_is_held_to_its_own_ceiling(bench):
    rows = bench.target_rows(None, _train('AMX', [_step('fp32', 256.0), _step('bf16', 900.0)]), None, None)
    by = {r['target']: r for r in rows}
    fp32 = by['fp32 step, fraction of the fp32 ceiling']
    assert fp32['value'] == pytest.approx(256.0 / 320.0)  # the higher of the fp32 ceilings, not the bf16 one
    assert fp32['met'] is True
    bf16 = by['bf16 step, fraction of the bf16 ceiling (AMX)']
    assert bf16['value'] == pytest.approx(0.45) and bf16['goal'] == 0.40 and bf16['met'] is True


def test_the_bf16_goal_depends_on_the_cpu_class(bench):
    step = [_step('bf16', 900.0)]  # 45% of the ceiling: enough on AMX, not on AVX-512 BF16 without AMX
    amx = bench.target_rows(None, _train('AMX', step), None, None)[0]
    avx512 = bench.target_rows(None, _train('AVX-512 BF16', step), None, None)[0]
    assert (amx['goal'], amx['met']) == (0.40, True)
    assert (avx512['goal'], avx512['met']) == (0.60, False)


def test_checkpointed_steps_and_memory_against_a_baseline(bench):
    train = _train('AMX', [_step('bf16', 900.0, memory=4200.0), _step('bf16', 700.0, ckpt=True, memory=3000.0)],
                   checkpointing={'bf16': {'peak_memory_ratio': 3000 / 4200, 'step_time_ratio': 1.2}})
    baseline = {'results': [_step('bf16', 800.0, memory=4100.0)]}
    rows = bench.target_rows(None, train, None, None, baseline)
    targets = [r['target'] for r in rows]
    # the checkpointed step has no fraction row of its own: the targets are of the plain step
    assert targets.count('bf16 step, fraction of the bf16 ceiling (AMX)') == 1
    memory = next(r for r in rows if r['target'] == 'peak memory, bf16, batch 32')
    assert memory['goal'] == 4100.0 and memory['met'] is False  # 4200 MB against the baseline's 4100
    ckpt = next(r for r in rows if r['target'] == 'activation checkpointing, bf16')
    assert '-29%' in ckpt['figure'] and '+20%' in ckpt['figure']


def test_evaluation_and_data_rows(bench):
    eval_ = {'by_precision': {'fp32': {'results': {'one_pass': {'crops_per_s': 3.0}}, 'one_vs_two_pass': 1.9},
                              'bf16': {'results': {'one_pass': {'crops_per_s': 9.0}}, 'one_vs_two_pass': 1.7}}}
    data = {'rates': {'official_pgseg_draft': 160.0, 'released': 100.0}, 'vs_released': 1.6}
    rows = {r['target']: r for r in bench.target_rows(None, None, eval_, data)}
    assert rows['evaluation, fp32, one encoder pass per crop']['met'] is True
    assert rows['evaluation, bf16, one encoder pass per crop']['met'] is False
    data_row = rows['data worker (official_pgseg with draft) against the released transform']
    assert data_row['met'] is True and data_row['value'] == 1.6 and '1.600x' in data_row['figure']


def test_an_eval_file_of_one_precision_still_reads(bench):
    """eval.json as written before both precisions were timed in one run: one precision, its results at the top."""
    old = {'precision': 'bf16', 'results': {'one_pass': {'crops_per_s': 9.0}}, 'one_vs_two_pass': 1.9}
    row = bench.target_rows(None, None, old, None)[0]
    assert row['target'] == 'evaluation, bf16, one encoder pass per crop' and row['met'] is True
