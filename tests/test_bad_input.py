"""Bad input at the command line (issue 7). For every case each script stops with exit status 2
and one line on stderr, 'error: <file or flag>: <problem>', without a traceback (unless --debug),
and leaves what is already on disk as it was.

Every case runs the real script in a subprocess on a tiny dataset. Most are caught by validation
before anything is written: then the whole case folder (dataset copy, output folder holding an
earlier run's files) must be byte-identical afterwards. A few can only show up while working
(a truncated PNG is found when decoded, a NaN loss when it happens): then the earlier run's
results must be intact and no temporary file left; the new run's own log and argument record may
have started."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from network.deeplab import DeepLab
from network.resnet38_cls import CAMClassifier
from tool.core.checkpoint import save_checkpoint
from tool.core.files import save_palette_png
from tool.data.datasets import DATASETS
from tool.data.synth import write_dataset

REPO = Path(__file__).resolve().parents[1]
ENV_THREADS = {'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
PROGRESS = re.compile(r'\|\s*\d+/\d+ \[')  # a tqdm progress bar refresh: progress, not an error line
LAYERS = ('PM_bn7', 'PM_b5_2', 'PM_b4_5')

# What an earlier run left in each script's output folder: its results, then its log and record.
EARLIER_RESULTS = {
    'stage1': ['stage1_checkpoint_trained_on_luad.pth', 'stage1_test_metrics.json', 'stage1_resume.pth'],
    'pm': ['PM_bn7/earlier.png', 'pseudo_mask_metrics.json'],
    'stage2': ['stage2_checkpoint_trained_on_luad.pth', 'test_metrics.json', 'stage2_resume.pth'],
    'infer': ['masks/earlier.png', 'overlays/earlier.png', 'areas.csv', 'metrics.json'],
}
EARLIER_LOGS = {'stage1': ['metrics.jsonl', 'stage1_args.json'], 'pm': ['generate_pm_args.json'],
                'stage2': ['metrics.jsonl', 'stage2_run_args.json'], 'infer': []}


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
    """Built once: a tiny luad dataset (pseudo-masks = its truth) and the checkpoints the cases use."""
    root = tmp_path_factory.mktemp('inputs')
    write_dataset(str(root / 'luad'), 'luad', 32, {'train': 8, 'val': 1, 'test': 2}, seed=0)
    for layer in LAYERS:
        shutil.copytree(root / 'luad' / 'train_gt', root / 'luad' / 'train_PM' / layer)
    torch.manual_seed(0)
    save_checkpoint(CAMClassifier(n_class=4, width=0.0625).state_dict(), str(root / 'stage1.pth'))
    save_checkpoint({'state_dict': DeepLab('mobilenet', num_classes=4).state_dict()}, str(root / 'stage2.pth'))
    save_checkpoint({'state_dict': DeepLab('mobilenet', num_classes=5).state_dict()}, str(root / 'five_classes.pth'))
    save_checkpoint({'state_dict': DeepLab('resnet18', num_classes=4).state_dict()}, str(root / 'resnet18.pth'))
    (root / 'random_bytes.pth').write_bytes(np.random.default_rng(0).bytes(4096))
    return root


# ---- the four command lines, tiny and on the CPU -------------------------------------------------

def stage1(data, out, *extra):
    return ['1_train_stage1.py', '--dataroot', data, '--dataset', 'luad', '--weights', 'none', '--width', 0.0625,
            '--batch_size', 4, '--max_epoches', 1, '--num_workers', 0, '--device', 'cpu', '--save_folder', out, *extra]


def pm(data, out, inputs, *extra):
    return ['2_generate_PM.py', '--weights', inputs / 'stage1.pth', '--dataroot', data, '--dataset', 'luad',
            '--layers', 'bn7', '--num_workers', 0, '--device', 'cpu', '--out', out, *extra]


def stage2(data, out, *extra):
    return ['3_train_stage2.py', '--dataroot', data, '--dataset', 'luad', '--backbone', 'mobilenet', '--resume', 'none',
            '--Is_GM', 'False', '--epochs', 1, '--batch-size', 4, '--workers', 0, '--device', 'cpu', '--savepath', out,
            *extra]


def infer(data, out, inputs, *extra):
    return ['4_infer.py', '--checkpoint', inputs / 'stage2.pth', '--input', data / 'test' / 'img', '--out', out,
            '--workers', 0, '--device', 'cpu', *extra]


# ---- the cases: each damages its own copy of the data and returns (argv, what the line must name)

def first(folder):
    return sorted(folder.iterdir())[0]


def write_mask(path, array):
    save_palette_png(array, DATASETS['luad'].palette, str(path))


def unparsable_label(data, out, inputs):
    bad = data / 'train' / 'synth-000000-[1 2 0 0].png'
    first(data / 'train').rename(bad)
    return stage1(data, out), [str(bad), 'does not fit --dataset luad']


def all_zero_label(data, out, inputs):
    bad = data / 'train' / 'synth-000000-[0 0 0 0].png'
    first(data / 'train').rename(bad)
    return stage1(data, out), [str(bad), 'names no class']


def missing_mask(data, out, inputs):
    missing = first(data / 'test' / 'mask')
    missing.unlink()
    return stage1(data, out), [str(missing), 'mask missing']


def mask_size_differs(data, out, inputs):
    bad = first(data / 'test' / 'mask')
    write_mask(bad, np.zeros((32, 33)))
    return stage1(data, out), [str(bad), 'mask is 33x32 but the image is 32x32']


def mask_value_above_4(data, out, inputs):
    bad = first(data / 'test' / 'mask')
    mask = np.zeros((32, 32))
    mask[3, 5] = 7
    write_mask(bad, mask)
    return stage1(data, out), [str(bad), 'mask value 7 outside 0..4']


def truncated_png(data, out, inputs):
    bad = first(data / 'train')
    bad.write_bytes(bad.read_bytes()[:bad.stat().st_size // 2])
    # read in a DataLoader worker process, as by default: its error must still come out as one line
    return stage1(data, out, '--num_workers', 1), [str(bad), 'truncated or corrupt']


def non_image_file(data, out, inputs):
    (data / 'train' / 'README.txt').write_text('not a patch: ignored, like the reference\'s *.png glob\n')
    bad = data / 'train' / 'notes-[1 0 0 0].png'
    bad.write_text('not a PNG\n')
    return stage1(data, out), [str(bad), 'not a readable image']


def empty_split_folder(data, out, inputs):
    for folder in (data / 'test' / 'img', data / 'test' / 'mask'):
        shutil.rmtree(folder)
        folder.mkdir()
    return stage1(data, out), [str(data / 'test' / 'img'), 'no .png files']


def wrong_dataset(data, out, inputs):
    return stage1(data, out, '--dataset', 'bcss'), \
        [str(first(data / 'train')), 'a luad-style label', 'does not fit --dataset bcss']


def corrupt_checkpoint(data, out, inputs):
    return stage1(data, out, '--resume', inputs / 'random_bytes.pth'), \
        [str(inputs / 'random_bytes.pth'), 'corrupt, or not a PyTorch checkpoint']


def batch_size_larger_than_dataset(data, out, inputs):
    return stage1(data, out, '--batch_size', 64), ['fewer than one batch (--batch_size 64)']


def nan_loss(data, out, inputs):
    # an absurd learning rate: the weights overflow after the first step, the loss becomes NaN
    return stage1(data, out, '--lr', 1e30), ['epoch 0 step 1: loss is nan', '--lr']


def stage1_output_not_writable(data, out, inputs):
    # Root ignores file permissions: a folder under a regular file cannot be created by anyone.
    # 2_generate_PM.py and 4_infer.py write through the same tool.core.files.atomic_write as stage 1;
    # stage 2 opens its log first, so it has its own case.
    blocked = out / 'stage1_test_metrics.json' / 'run'
    return stage1(data, blocked), [str(blocked), 'cannot write here']


def missing_checkpoint(data, out, inputs):
    missing = inputs / 'no_such_stage1.pth'
    return pm(data, out, inputs, '--weights', missing), [str(missing), 'checkpoint not found']


def missing_train_pm(data, out, inputs):
    shutil.rmtree(data / 'train_PM')
    return stage2(data, out), [str(data / 'train_PM' / 'PM_bn7'), 'run 2_generate_PM.py first']


def pseudo_mask_size_differs(data, out, inputs):
    bad = first(data / 'train_PM' / 'PM_b5_2')
    write_mask(bad, np.zeros((32, 33)))
    return stage2(data, out), [str(bad), 'mask is 33x32 but the image is 32x32']


def wrong_architecture(data, out, inputs):
    return stage2(data, out, '--resume', inputs / 'resnet18.pth'), \
        [str(inputs / 'resnet18.pth'), 'does not match the model', 'missing: backbone.features', 'unexpected: backbone.conv1.weight']


def stage2_output_not_writable(data, out, inputs):
    blocked = out / 'test_metrics.json' / 'run'
    return stage2(data, blocked), [str(blocked), 'cannot write here']


def wrong_class_count(data, out, inputs):
    return infer(data, out, inputs, '--checkpoint', inputs / 'five_classes.pth'), \
        [str(inputs / 'five_classes.pth'), 'predicts 5 classes, --dataset luad has 4']


# case -> (script, when it is caught: 'before' anything is written, or 'during' the work)
CASES = {
    unparsable_label: ('stage1', 'before'),
    all_zero_label: ('stage1', 'before'),
    missing_mask: ('stage1', 'before'),
    mask_size_differs: ('stage1', 'before'),
    mask_value_above_4: ('stage1', 'before'),
    truncated_png: ('stage1', 'during'),
    non_image_file: ('stage1', 'before'),
    empty_split_folder: ('stage1', 'before'),
    wrong_dataset: ('stage1', 'before'),
    corrupt_checkpoint: ('stage1', 'before'),
    batch_size_larger_than_dataset: ('stage1', 'before'),
    nan_loss: ('stage1', 'during'),
    stage1_output_not_writable: ('stage1', 'before'),
    missing_checkpoint: ('pm', 'before'),
    missing_train_pm: ('stage2', 'before'),
    pseudo_mask_size_differs: ('stage2', 'before'),
    wrong_architecture: ('stage2', 'before'),
    stage2_output_not_writable: ('stage2', 'before'),
    wrong_class_count: ('infer', 'before'),
}


def snapshot(folder):
    """Every file's bytes and every folder under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else 'folder' for p in folder.rglob('*')}


def changed(before, after):
    """Paths created, removed or rewritten between two snapshots."""
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


def prepare(case, inputs, tmp_path):
    """A copy of the data for the case to damage, and an output folder holding an earlier run."""
    data, out = tmp_path / 'data', tmp_path / 'out'
    shutil.copytree(inputs / 'luad', data)
    script = CASES[case][0]
    for name in EARLIER_RESULTS[script] + EARLIER_LOGS[script]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(f'earlier run: {name}\n'.encode())
    return case(data, out, inputs)


def run(argv):
    env = {**os.environ, **ENV_THREADS}
    return subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize('case', CASES, ids=[case.__name__ for case in CASES])
def test_bad_input_exits_2_with_one_line_and_damages_nothing(case, inputs, tmp_path):
    argv, names = prepare(case, inputs, tmp_path)
    before, inputs_before = snapshot(tmp_path), snapshot(inputs)
    result = run(argv)

    assert result.returncode == 2, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
    for name in names:
        assert name in lines[0]

    assert not changed(inputs_before, snapshot(inputs))
    changes = changed(before, snapshot(tmp_path))
    if CASES[case][1] == 'before':
        assert not changes  # nothing written, nothing changed
    else:  # the new run's own log and argument record, and nothing else
        script = CASES[case][0]
        assert set(changes) <= {os.path.join('out', name) for name in EARLIER_LOGS[script]}, changes


def test_debug_shows_the_traceback(inputs, tmp_path):
    argv, names = prepare(all_zero_label, inputs, tmp_path)
    result = run([*argv, '--debug'])
    assert result.returncode == 1
    assert 'Traceback (most recent call last)' in result.stderr
    assert f'tool.core.errors.InputError: {names[0]}: label [0 0 0 0] names no class' in result.stderr
