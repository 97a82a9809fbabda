"""Scale and speed: torchrun runs give the numbers of one process, and the CUDA-speed settings
that a CPU can check.

The distributed tests start `python -m torch.distributed.run --nproc_per_node 2 --standalone`
(gloo, CPU, OMP_NUM_THREADS=1) on a tiny synthetic dataset and compare with the same command in
one process (run in-process, also one thread):

- evaluation (stage-1 CAM test, stage-2 test with the gate) and pseudo-masks: each process takes
  every second patch and the confusion matrices of the processes add up, so the scores must be
  *identical* and the pseudo-mask PNGs *byte-identical*. Both runs put the same number of patches
  in a forward pass (1, or 4 for the stage-2 test): a convolution may round differently at
  another batch size.
- training: both runs take the same global batches (one DistributedSampler order; per-process
  batch = global / 2; checked exactly in test_both_runs_take_the_same_global_batches), DDP
  averages the gradients, and the per-step learning rates must be identical. BatchNorm is frozen
  (stage 1 fine-tunes a checkpoint, as the reference does; stage 2 runs with --freeze-bn):
  SyncBatchNorm, which a training BatchNorm needs under DDP (and gets on CUDA), refuses CPU
  tensors in torch 2.14, so no CPU test can compare training BatchNorm.
  What still differs are the random draws: each process draws its own dropout masks (stage 1:
  Dropout2d(0.5) before fc8 and the b6/b7 dropouts; stage 2: the decoder's dropouts), flips and
  blur, from (seed, epoch, rank). That is the noise of a 1-process run with other random draws, and on
  runs this small it dominates the update (1-process controls with other draws, measured: update
  directions agree with cosine ~0.4). So the weights are not compared element by element, but:
    * the size of the update ||w_end - w_start||, 2 processes / 1 process, within UPDATE_RATIO.
      Measured: stage 1 1.07 (six 1-process controls 0.95-1.05), stage 2 0.92 (five controls
      0.93-1.00); a gradient summed instead of averaged over the processes (simulated with twice
      the learning rate) gives 2.15 and 1.82. Both runs start from the networks' own
      initialisation, where that size is stable; from a start with data-calibrated BatchNorm
      statistics the controls spread 0.67-1.0, too wide for a useful band;
    * the logged per-step losses (the global batch's: averaged over the processes) within the
      LOSS_TOLERANCE constants below. Stage 1 starts with features near 0, so its loss stays near
      log 2: these runs check the distributed mechanics, test_stage1 checks that training learns.
"""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from network.deeplab import DeepLab
from network.resnet38_cls import CAMClassifier
from tool.core import distributed, runtime
from tool.core.checkpoint import load_checkpoint, read_state_dict
from tool.data.synth import write_dataset
from tool.stages import pseudo_masks, stage1, stage2

REPO = Path(__file__).resolve().parents[1]
WIDTH = 0.0625  # ResNet-38 at 1/16 width: full depth, seconds on a CPU
SIZE = 32
TRAIN, TEST = 16, 8  # 8 test patches: 4 per process, so stage 2 tests batches of 4 in both runs
UPDATE_RATIO = (0.75, 1.33)
# Per-step losses, 2 processes against 1 (measured: stage 1 within 1e-4 of each other around log 2,
# stage 2 within 2 %; a loss summed over the processes, or one process's loss / world size as the
# stage-2 log held before, is off by a factor 2).
STAGE1_LOSS_TOLERANCE = dict(abs=1e-3)
STAGE2_LOSS_TOLERANCE = dict(rel=0.1)


# ---- CUDA speed settings and host reads, checked on the CPU -------------------------------------

def test_autocast_dtype_is_bf16_where_supported_else_fp16_and_none_off_cuda(monkeypatch, capsys):
    cuda = torch.device('cuda')  # a device object only: nothing runs on it
    assert runtime.autocast_dtype(False, cuda) is None
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda: True)
    assert runtime.autocast_dtype(True, cuda) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda: False)
    assert runtime.autocast_dtype(True, cuda) is torch.float16  # the callers then scale the loss
    assert runtime.autocast_dtype(True, torch.device('cpu')) is None
    assert '--amp is for CUDA' in capsys.readouterr().out


def test_cpu_keeps_nchw_and_both_networks_give_the_same_numbers_in_channels_last():
    """On CUDA the models run in channels_last; on the CPU (which also has channels_last kernels)
    check that nothing in them assumes NCHW: same logits and gradients in either layout. Width 1/8:
    at 1/16 (4 channels) oneDNN's channels_last backward of a strided 1x1 convolution corrupts
    memory on the CPU in torch 2.14, one more reason the CPU stays in NCHW."""
    assert runtime.configure_cuda_speed(torch.device('cpu')) == torch.contiguous_format
    torch.manual_seed(0)
    images = torch.rand(2, 3, SIZE, SIZE)
    for model, run in ((CAMClassifier(4, 2 * WIDTH, frozen=False), lambda m, x: m(x, enable_pda=True)),
                       (DeepLab('resnet18', 16, num_classes=4), lambda m, x: m(x))):
        model.eval()  # no dropout: the two passes must see the same network
        outputs, grads = [], []
        for memory_format in (torch.contiguous_format, torch.channels_last):
            model.to(memory_format=memory_format).zero_grad()
            out = run(model, images.contiguous(memory_format=memory_format))
            out.square().sum().backward()
            outputs.append(out.detach())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        assert torch.allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
        assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-5 * grads[0].abs().max())


def test_data_workers_are_capped_by_the_cores_of_each_local_process(monkeypatch):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    assert (runtime.data_workers(10), runtime.data_workers(3), runtime.data_workers(0)) == (8, 3, 0)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')
    assert runtime.data_workers(10) == 2


HOST_READS = ('item', 'tolist', 'cpu', 'numpy', '__bool__', '__float__', '__int__')
TRAINING_CODE = {str(REPO / 'tool' / f) for f in ('stages/stage1.py', 'stages/stage2.py', 'stages/training.py',
                                                  'method/losses.py', 'core/runtime.py', 'core/distributed.py')} | \
                {str(p) for p in (REPO / 'network').glob('*.py')}


class CountingLoader:
    """A list of batches that counts how many it has handed out (= the current step + 1)."""

    def __init__(self, batches):
        self.batches, self.served = batches, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            self.served += 1
            yield batch


@contextlib.contextmanager
def host_reads_by_step(monkeypatch, loader):
    """Record the step of every Tensor method call that reads values back to the host (on CUDA: a
    synchronisation) made directly by the training code."""
    steps = []

    def recording(original):
        def method(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename in TRAINING_CODE:
                steps.append(loader.served - 1)
            return original(self, *args, **kwargs)
        return method

    with monkeypatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, recording(getattr(torch.Tensor, name)))
        yield steps


def test_training_loops_read_back_to_the_host_only_at_log_steps(monkeypatch, tmp_path):
    """The reference reads the loss (and stage 1 the predictions) back every step and empties the
    CUDA cache; ours keeps them on the device and reads them every --print_freq (stage 1) or
    LOG_EVERY (stage 2) steps, and after the last."""
    torch.manual_seed(0)
    steps = 6
    images = [torch.rand(2, 3, SIZE, SIZE) for _ in range(steps)]

    args = stage1.get_args_parser().parse_args(['--print_freq', '4', '--max_epoches', '4', '--lr', '1e-3'])
    model = CAMClassifier(4, WIDTH, frozen=False)
    optimizer = stage1.make_optimizer(model, args)
    loader = CountingLoader([{'image': x, 'label': torch.tensor([[1., 0, 1, 0], [0, 1, 0, 1]])} for x in images])
    scaler = runtime.grad_scaler(None)
    with host_reads_by_step(monkeypatch, loader) as reads:  # epoch 3: PDA on
        stage1.train_one_epoch(model, optimizer, loader, torch.device('cpu'), 3, 0, args,
                               runtime.MetricsLog(str(tmp_path / 's1.jsonl')), scaler)
    assert reads and set(reads) == {3, 5}

    args = stage2.get_args_parser().parse_args(['--epochs', '1', '--lr', '1e-3'])
    model = DeepLab('resnet18', 16, num_classes=4)
    masks = torch.randint(0, 5, (2, 3, SIZE, SIZE))
    loader = CountingLoader([{'image': x, 'masks': masks} for x in images])
    with host_reads_by_step(monkeypatch, loader) as reads:
        stage2.train_one_epoch(model, stage2.make_optimizer(model, args), loader, torch.device('cpu'), 0, args,
                               runtime.MetricsLog(str(tmp_path / 's2.jsonl')), scaler)
    assert stage2.LOG_EVERY > steps and reads and set(reads) == {steps - 1}


# ---- the same global batches in 1 and 2 processes ----------------------------------------------

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('distributed') / 'luad'
    write_dataset(str(root), 'luad', SIZE, {'train': TRAIN, 'val': 4, 'test': TEST}, seed=0)
    return root


def batches_per_step(make_loader, monkeypatch, world_size, epoch):
    """[[names of the global batch]] of one epoch, the processes' batches of each step merged."""
    per_rank = []
    for rank in range(world_size):
        monkeypatch.setattr(distributed, 'get_rank', lambda: rank)
        monkeypatch.setattr(distributed, 'get_world_size', lambda: world_size)
        loader = make_loader()
        loader.sampler.set_epoch(epoch)
        per_rank.append([batch['name'] for batch in loader])
    return [sorted(sum(step, [])) for step in zip(*per_rank)]


def test_both_runs_take_the_same_global_batches(data, monkeypatch):
    # --batch_size (stage 1) and --batch-size (stage 2) are the global batch.
    stage1_loader = lambda batch: lambda: stage1.make_data_loaders(stage1.get_args_parser().parse_args(
        ['--trainroot', str(data / 'train'), '--testroot', str(data / 'test'), '--dataset', 'luad',
         '--batch_size', str(batch), '--num_workers', '0']),
        torch.device('cpu'))[0]
    for name in ('get_rank', 'get_world_size'):  # stage 1 imported them by name
        monkeypatch.setattr(stage1, name, lambda name=name: getattr(distributed, name)())
    stage2_loader = lambda: stage2.make_train_loader(stage2.get_args_parser().parse_args(
        ['--dataroot', str(data), '--dataset', 'luad', '--batch-size', '8', '--workers', '0', '--device', 'cpu',
         '--supervision', 'gt']))
    for epoch in (0, 1):
        one = batches_per_step(stage1_loader(8), monkeypatch, 1, epoch)
        assert len(one) == TRAIN // 8 and one == batches_per_step(stage1_loader(8), monkeypatch, 2, epoch)
        one = batches_per_step(stage2_loader, monkeypatch, 1, epoch)
        assert len(one) == TRAIN // 8 and one == batches_per_step(stage2_loader, monkeypatch, 2, epoch)
    assert one != batches_per_step(stage2_loader, monkeypatch, 1, 0)  # epochs are reshuffled


# ---- torchrun with 2 processes against 1 process -----------------------------------------------

def torchrun(script, *args):
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone',
               script, *map(str, args)]
    done = subprocess.run(command, cwd=REPO, env={**env, 'OMP_NUM_THREADS': '1'}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def records(path):
    return [json.loads(line) for line in open(path)]


def update_size(start, end):
    """||end - start|| over the floating-point tensors of two state_dicts."""
    return torch.cat([(end[k].float() - start[k].float()).flatten()
                      for k in start if start[k].is_floating_point()]).norm().item()


@pytest.fixture(scope='module')
def stage1_runs(data, tmp_path_factory):
    """4 epochs (PDA in the last) at a global batch of 8, in one process and in two, fine-tuning
    a checkpoint of the network's own initialisation (BatchNorm frozen, as the reference trains)."""
    folder = tmp_path_factory.mktemp('stage1')
    torch.manual_seed(0)
    start = folder / 'start.pth'
    torch.save(CAMClassifier(4, WIDTH).state_dict(), start)
    # --wt_dec 0: on these tiny gradients weight decay would make up most of the update. --pda
    # normalised: from this start every CAM is <= 0, the reference map zeroes the features in PDA's
    # epoch and the run stops as a dead classifier (tests/test_pda.py).
    common = ['--dataroot', data, '--dataset', 'luad', '--weights', start, '--width', WIDTH, '--max_epoches', 4,
              '--num_workers', 0, '--device', 'cpu', '--print_freq', 1, '--lr', 0.01, '--wt_dec', 0,
              '--pda', 'normalised']
    stage1.main(stage1.get_args_parser().parse_args(map(str, [*common, '--batch_size', 8,
                                                              '--save_folder', folder / 'one'])))
    torchrun('1_train_stage1.py', *common, '--batch_size', 8, '--save_folder', folder / 'two')
    return start, folder / 'one', folder / 'two'


def compare_training(one, two, start, end, loss_tolerance):
    """The checks both stages share: the same files (rank 0 alone writes them), each step logged
    once with the same learning rate, losses within the tolerance, update sizes within UPDATE_RATIO."""
    assert sorted(os.listdir(one)) == sorted(os.listdir(two))
    steps = {run: [r for r in records(run / 'metrics.jsonl') if 'loss' in r] for run in (one, two)}
    assert [(r['step'], r['lr']) for r in steps[one]] == [(r['step'], r['lr']) for r in steps[two]]
    for a, b in zip(steps[one], steps[two]):
        assert b['loss'] == pytest.approx(a['loss'], **loss_tolerance)
    ratio = update_size(start, end(two)) / update_size(start, end(one))
    assert UPDATE_RATIO[0] <= ratio <= UPDATE_RATIO[1]
    return steps[two]


def test_stage1_training_in_two_processes_matches_one(stage1_runs):
    start, one, two = stage1_runs
    end = lambda run: read_state_dict(run / 'stage1_checkpoint_trained_on_luad.pth')
    steps = compare_training(one, two, read_state_dict(start), end, STAGE1_LOSS_TOLERANCE)
    assert [r['pda'] for r in steps] == [False] * 6 + [True] * 2  # 2 steps an epoch, PDA from epoch 3
    epochs = [r for r in records(two / 'metrics.jsonl') if 'epoch_loss' in r]
    assert [r['epoch'] for r in epochs] == [0, 1, 2, 3]


def test_stage1_test_phase_scores_are_identical_in_one_and_two_processes(data, stage1_runs, tmp_path):
    """The 2-process run's own test phase against one process scoring the same checkpoint."""
    two = stage1_runs[2]
    stage1.main(stage1.get_args_parser().parse_args(map(str, [
        '--test_only', '--weights', two / 'stage1_checkpoint_trained_on_luad.pth', '--dataroot', data,
        '--dataset', 'luad', '--num_workers', 0, '--device', 'cpu', '--save_folder', tmp_path])))
    scores = json.loads((two / 'stage1_test_metrics.json').read_text())
    assert scores['patches'] == TEST
    assert json.loads((tmp_path / 'stage1_test_metrics.json').read_text()) == scores


PM_ARGS = ['--dataset', 'luad', '--num_workers', 0, '--device', 'cpu', '--batch_size', 1]


@pytest.fixture(scope='module')
def pm_source(data, stage1_runs):
    """One process writes the pseudo-masks into DATA/train_PM (stage 2 trains on them); returns
    the stage-1 checkpoint they come from."""
    checkpoint = stage1_runs[1] / 'stage1_checkpoint_trained_on_luad.pth'
    pseudo_masks.main(pseudo_masks.get_args_parser().parse_args(map(str, [
        '--weights', checkpoint, '--dataroot', data, *PM_ARGS])))
    return checkpoint


def test_pseudo_masks_of_two_processes_are_byte_identical(data, pm_source, tmp_path):
    torchrun('2_generate_PM.py', '--weights', pm_source, '--dataroot', data, *PM_ARGS, '--out', tmp_path)
    one = data / 'train_PM'
    for layer in ('PM_b4_5', 'PM_b5_2', 'PM_bn7'):
        names = sorted(os.listdir(one / layer))
        assert len(names) == TRAIN and sorted(os.listdir(tmp_path / layer)) == names
        assert all((one / layer / n).read_bytes() == (tmp_path / layer / n).read_bytes() for n in names)
    assert json.loads((tmp_path / pseudo_masks.METRICS_FILE).read_text()) == \
        json.loads((one / pseudo_masks.METRICS_FILE).read_text())


@pytest.fixture(scope='module')
def stage2_runs(data, pm_source, tmp_path_factory):
    """2 epochs at a global batch of 8 (4 per process) from DeepLab's own initialisation with
    --freeze-bn, in one process and in two; tested with the gate."""
    folder = tmp_path_factory.mktemp('stage2')
    torch.manual_seed(0)
    start = folder / 'start.pth'
    torch.save({'state_dict': DeepLab('resnet18', 16, num_classes=4).state_dict()}, start)
    common = ['--dataroot', data, '--dataset', 'luad', '--resume', start, '--backbone', 'resnet18', '--freeze-bn',
              'True', '--epochs', 2, '--batch-size', 8, '--lr', 1e-3, '--workers', 0, '--device', 'cpu',
              '--resume_stage1', pm_source]
    stage2.main(stage2.get_args_parser().parse_args(map(str, [*common, '--savepath', folder / 'one'])))
    torchrun('3_train_stage2.py', *common, '--savepath', folder / 'two')
    return start, folder / 'one', folder / 'two'


def test_stage2_training_in_two_processes_matches_one(stage2_runs):
    start, one, two = stage2_runs
    end = lambda run: load_checkpoint(str(run / 'stage2_resume.pth'))['model']
    compare_training(one, two, read_state_dict(start), end, STAGE2_LOSS_TOLERANCE)
    assert [r['epoch'] for r in records(two / 'metrics.jsonl') if r.get('split') == 'val'] == [0, 1]


def test_stage2_test_scores_are_identical_in_one_and_two_processes(data, pm_source, stage2_runs, tmp_path):
    """The 2-process run's test of its best checkpoint, with the gate, against one process testing
    it (--batch-size 4: the batches of 4 that each of the two processes ran)."""
    two = stage2_runs[2]
    stage2.main(stage2.get_args_parser().parse_args(map(str, [
        '--test_only', '--resume', two / 'stage2_checkpoint_trained_on_luad.pth', '--resume_stage1', pm_source,
        '--dataroot', data, '--dataset', 'luad', '--batch-size', 4, '--workers', 0, '--device', 'cpu',
        '--savepath', tmp_path])))
    scores = json.loads((two / 'test_metrics.json').read_text())
    assert list(scores['modes']) == ['no_gate', 'gate_multiply', 'gate_mask']
    assert json.loads((tmp_path / 'test_metrics.json').read_text()) == scores
