"""Kill and resume (issue 7): a training run killed with SIGKILL in the middle of an epoch and
continued with --resume auto (stage 1) or --resume_state auto (stage 2) ends exactly as the same
run left alone: the same final weights, the same test metrics, the same per-step log.

Each run is a subprocess of the real command line on the CPU with one thread, so that the only
difference between the two runs is the kill. Exact equality is expected: every random draw of an
epoch is seeded from (seed, epoch) in both stages, the learning rate follows from the step, and a
one-threaded CPU computes the same floats in the same order."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tool.core.checkpoint import load_checkpoint, read_state_dict
from tool.data.synth import write_dataset

REPO = Path(__file__).resolve().parents[1]
# One thread: the same summation order in every run; and far faster on a shared machine.
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}


def start(argv, folder):
    """Start a command line of the repository, its output to files in `folder` (read on failure)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / 'stdout.txt', 'ab') as out, open(folder / 'stderr.txt', 'ab') as err:
        return subprocess.Popen([sys.executable, *map(str, argv)], cwd=REPO, env=ENV, stdout=out, stderr=err)


def finish(process, folder, timeout=300):
    try:
        assert process.wait(timeout) == 0, (folder / 'stderr.txt').read_text()[-3000:]
    finally:
        process.kill()  # only if still running (timed out): leave no run behind


def records(path):
    """The records of a metrics.jsonl; a line cut short by the kill is skipped."""
    found = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return found


def step_records(path):
    return [r for r in records(path) if 'loss' in r]


def kill_during_epoch(process, folder, epoch, timeout=300):
    """SIGKILL the run as soon as it logs a training step of `epoch`: its resume state of the
    epoch before is written, and that epoch is under way."""
    deadline = time.monotonic() + timeout
    try:
        while not any(r['epoch'] >= epoch for r in step_records(folder / 'metrics.jsonl')):
            assert process.poll() is None, (f'the run ended (status {process.returncode}) before it could be '
                                            f'killed: {(folder / "stderr.txt").read_text()[-3000:]}')
            assert time.monotonic() < deadline, 'no training step logged in time'
            time.sleep(0.005)
    finally:
        process.send_signal(signal.SIGKILL)  # the kill; or, after a failure, no run left behind
    assert process.wait(60) == -signal.SIGKILL


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f'{len(different)} tensors differ, e.g. {different[:3]}'


# ---- stage 1 -------------------------------------------------------------------------------------

def stage1_argv(data, folder, *extra):
    # 16 patches / batch 2 = 8 steps an epoch, logged every step; epoch 3 runs with PDA, so the
    # resumed run also depends on the restored gamma.
    return ['1_train_stage1.py', '--dataroot', data, '--dataset', 'luad', '--weights', 'none', '--width', 0.0625,
            '--batch_size', 2, '--max_epoches', 4, '--num_workers', 0, '--device', 'cpu', '--print_freq', 1,
            '--save_folder', folder, *extra]


def test_stage1_killed_mid_epoch_and_resumed_ends_as_an_uninterrupted_run(tmp_path):
    data = tmp_path / 'data'
    write_dataset(str(data), 'luad', 32, {'train': 16, 'val': 1, 'test': 3}, seed=0)
    straight, killed = tmp_path / 'straight', tmp_path / 'killed'
    finish(start(stage1_argv(data, straight), straight), straight)

    kill_during_epoch(start(stage1_argv(data, killed), killed), killed, epoch=1)
    # Killed inside epoch `done`: its resume state is that of the epoch before (normally epoch 0,
    # as the kill follows the first logged step of epoch 1), and some of its steps were logged.
    done = load_checkpoint(str(killed / 'stage1_resume.pth'))['epoch'] + 1
    assert done < 4 and any(r['epoch'] == done for r in step_records(killed / 'metrics.jsonl'))
    assert not (killed / 'stage1_checkpoint_trained_on_luad.pth').exists()

    finish(start(stage1_argv(data, killed, '--resume', 'auto'), killed), killed)
    assert f'resuming at epoch {done} (step {8 * done})' in (killed / 'stdout.txt').read_text()

    name = 'stage1_checkpoint_trained_on_luad.pth'
    assert_same_weights(read_state_dict(str(straight / name)), read_state_dict(str(killed / name)))
    metrics = [json.loads((run / 'stage1_test_metrics.json').read_text()) for run in (straight, killed)]
    for m in metrics:
        m.pop('checkpoint')  # the path, which differs
    assert metrics[0] == metrics[1]
    # the steps the kill cut short were dropped from the log and done again, identically
    log = lambda run: [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert log(killed) == log(straight) and len(step_records(straight / 'metrics.jsonl')) == 32
    final = [load_checkpoint(str(run / 'stage1_resume.pth')) for run in (straight, killed)]
    assert final[0]['gamma'] == final[1]['gamma'] == pytest.approx(0.98 ** 4)
    assert_same_weights(final[0]['model'], final[1]['model'])


# ---- stage 2 -------------------------------------------------------------------------------------

def stage2_argv(data, folder, *extra):
    # 48 patches / batch 2 = 24 steps an epoch. Stage 2 logs losses every 20 steps, so the first
    # record of epoch 1 comes with 4 steps of it left: the kill lands inside the epoch.
    return ['3_train_stage2.py', '--dataroot', data, '--dataset', 'luad', '--backbone', 'mobilenet',
            '--resume', 'none', '--supervision', 'gt', '--Is_GM', 'False', '--epochs', 2, '--batch-size', 2,
            '--workers', 0, '--device', 'cpu', '--savepath', folder, *extra]


def test_stage2_killed_mid_epoch_and_resumed_ends_as_an_uninterrupted_run(tmp_path):
    data = tmp_path / 'data'
    write_dataset(str(data), 'luad', 32, {'train': 48, 'val': 2, 'test': 2}, seed=0)
    straight, killed = tmp_path / 'straight', tmp_path / 'killed'
    finish(start(stage2_argv(data, straight), straight), straight)

    kill_during_epoch(start(stage2_argv(data, killed), killed), killed, epoch=1)
    state = load_checkpoint(str(killed / 'stage2_resume.pth'))
    assert (state['epoch'], state['step']) == (1, 24)  # one epoch done; the second under way
    assert not (killed / 'test_metrics.json').exists()

    finish(start(stage2_argv(data, killed, '--resume_state', 'auto'), killed), killed)
    assert f'resumed from {killed / "stage2_resume.pth"}: 1 epoch(s) done' in (killed / 'stdout.txt').read_text()

    for name in ('stage2_checkpoint_trained_on_luad.pth', 'stage2_resume.pth'):
        a, b = load_checkpoint(str(straight / name)), load_checkpoint(str(killed / name))
        weights = 'state_dict' if 'state_dict' in a else 'model'
        assert (a['epoch'], a['best_pred']) == (b['epoch'], b['best_pred'])
        assert_same_weights(a[weights], b[weights])
    reports = [json.loads((run / 'test_metrics.json').read_text()) for run in (straight, killed)]
    assert reports[0]['modes'] == reports[1]['modes']
    # stage 2 appends to its log: the killed epoch's records come twice, the last ones as the
    # uninterrupted run's (same learning rate at the same step: the schedule resumed in place)
    by_step = lambda run: {r['step']: r for r in step_records(run / 'metrics.jsonl')}
    assert by_step(killed) == by_step(straight) and sorted(by_step(straight)) == list(range(48))
    val = lambda run: [r for r in records(run / 'metrics.jsonl') if r.get('split') == 'val']
    assert val(killed) == val(straight) and len(val(straight)) == 2
