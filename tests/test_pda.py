"""PDA's two maps (network/pda.py) and what they do to a training run: the reference map can zero
the network, the normalised one cannot, and a dead classifier stops the run with one clear line."""
import json

import pytest
import torch
import torch.nn.functional as F

from network.pda import PDA_MODES, progressive_dropout_attention
from network.resnet38_cls import CAMClassifier
from tool.core.errors import run_cli
from tool.core.runtime import MetricsLog, grad_scaler
from tool.data.synth import write_dataset
from tool.stages import stage1

WIDTH = 0.0625


def loop_map(features, weight, gamma):
    """The reference's map written plainly, one image and one class at a time."""
    n_class = weight.shape[0]
    maps = torch.zeros(features.shape[0], 1, *features.shape[2:])
    for b in range(features.shape[0]):
        for c in range(n_class):
            cam = torch.relu((weight[c, :, 0, 0, None, None] * features[b]).sum(0))
            maps[b, 0] += torch.where(cam > gamma * cam.max(), 0.0, cam) / n_class
    return maps


@pytest.mark.parametrize('gamma', [1.0, 0.8, 0.0])
def test_normalised_map_is_the_reference_map_over_its_mean(gamma):
    torch.manual_seed(0)
    features, weight = torch.rand(3, 16, 5, 7), torch.randn(4, 16, 1, 1)  # some CAMs > 0, some <= 0
    maps = loop_map(features, weight, gamma)
    expected = features * torch.where(maps.mean((2, 3), keepdim=True) > 0,
                                      maps / maps.mean((2, 3), keepdim=True).clamp_min(1e-30), torch.ones_like(maps))
    out = progressive_dropout_attention(features, weight, gamma, 'normalised')
    assert torch.allclose(out, expected, atol=1e-6)
    # the same spatial pattern as the reference's, at mean 1 per image wherever the map is not 0
    reference = progressive_dropout_attention(features, weight, gamma, 'reference')
    assert torch.allclose(reference, features * maps, atol=1e-6)


def test_where_every_cam_is_negative_reference_zeroes_and_normalised_keeps_the_features():
    torch.manual_seed(1)
    features = torch.rand(2, 8, 4, 4, requires_grad=True)  # ReLU'd features are >= 0 ...
    weight = (-torch.rand(4, 8, 1, 1)).requires_grad_()  # ... so with fc8 < 0 every CAM is <= 0
    assert F.relu(F.conv2d(features, weight)).max() == 0
    dead = progressive_dropout_attention(features, weight, 0.9, 'reference')
    assert dead.abs().max() == 0
    dead.sum().backward()
    assert features.grad.abs().max() == 0 and weight.grad.abs().max() == 0  # nothing can revive it
    kept = progressive_dropout_attention(features, weight, 0.9, 'normalised')
    assert torch.equal(kept, features)


def test_modes_are_checked():
    assert PDA_MODES == ('reference', 'normalised')
    with pytest.raises(ValueError, match='pda_mode'):
        CAMClassifier(4, WIDTH, pda_mode='auto')
    with pytest.raises(ValueError, match='PDA mode'):
        progressive_dropout_attention(torch.rand(1, 2, 2, 2), torch.rand(4, 2, 1, 1), 1.0, 'other')


@pytest.mark.parametrize('weights, pda, momentum', [('none', 'normalised', 0.9), ('w.pth', 'reference', 5e-4)])
def test_defaults_follow_where_training_starts(weights, pda, momentum):
    args = stage1.get_args_parser().parse_args(['--weights', weights])
    assert (stage1.pda_mode(args), stage1.momentum(args)) == (pda, momentum)
    args = stage1.get_args_parser().parse_args(['--weights', weights, '--pda', 'reference', '--momentum', '0.5'])
    assert (stage1.pda_mode(args), stage1.momentum(args)) == ('reference', 0.5)


def epoch_with_pda(pda, tmp_path, steps=6):
    """One PDA epoch (epoch 3) of a network whose CAMs are all <= 0 at the start. Returns the losses."""
    torch.manual_seed(0)
    args = stage1.get_args_parser().parse_args(['--weights', 'none', '--pda', pda, '--lr', '0.01',
                                                '--print_freq', '1', '--max_epoches', '4'])
    model = CAMClassifier(4, WIDTH, frozen=False, pda_mode=pda)
    with torch.no_grad():
        model.fc8.weight.copy_(-model.fc8.weight.abs())
    optimizer = stage1.make_optimizer(model, args)
    label = torch.tensor([[1., 0, 1, 0], [0, 1, 0, 1]])
    loader = [{'image': torch.rand(2, 3, 32, 32), 'label': label} for _ in range(steps)]
    log = MetricsLog(str(tmp_path / f'{pda}.jsonl'))
    stage1.train_one_epoch(model, optimizer, loader, torch.device('cpu'), 3, 0, args, log, grad_scaler(None))
    return [r['loss'] for r in map(json.loads, open(tmp_path / f'{pda}.jsonl')) if 'loss' in r]


def test_reference_map_kills_the_network_and_the_run_stops_saying_so(tmp_path):
    with pytest.raises(stage1.DeadClassifier) as info:
        epoch_with_pda('reference', tmp_path)
    message = str(info.value)
    assert message.startswith('epoch 3 step 5: the classifier has died')
    assert 'for 6 steps' in message and 'loss 0.6931' in message and '--pda normalised' in message
    assert '\n' not in message


def test_normalised_map_trains_on(tmp_path):
    losses = epoch_with_pda('normalised', tmp_path)
    assert len(losses) == 6 and all(abs(loss - 0.6931472) > 1e-3 for loss in losses)


def test_dead_run_exits_with_status_2_and_one_line(tmp_path, monkeypatch, capsys):
    """Through the command line: PDA from the first epoch on a network whose CAMs are all <= 0."""
    data = tmp_path / 'data'
    write_dataset(str(data), 'luad', 32, {'train': 16, 'val': 1, 'test': 2}, seed=0)
    make_model = stage1.make_model

    def negative_fc8(args):
        model, how = make_model(args)
        with torch.no_grad():
            model.fc8.weight.copy_(-model.fc8.weight.abs())
        return model, how

    monkeypatch.setattr(stage1, 'make_model', negative_fc8)
    args = stage1.get_args_parser().parse_args([
        '--dataroot', str(data), '--dataset', 'luad', '--weights', 'none', '--width', str(WIDTH), '--pda', 'reference',
        '--pda_from_epoch', '0', '--batch_size', '4', '--max_epoches', '3', '--num_workers', '0', '--device', 'cpu',
        '--save_folder', str(tmp_path / 'out')])
    with pytest.raises(SystemExit) as stop:
        run_cli(stage1.main, args)
    assert stop.value.code == 2
    last = capsys.readouterr().err.replace('\r', '\n').strip().splitlines()[-1]  # after the progress bar
    assert 'epoch 0 step 3: the classifier has died' in last and last.endswith('--pda normalised, or lower --lr')
    assert not (tmp_path / 'out' / 'stage1_checkpoint_trained_on_luad.pth').exists()
