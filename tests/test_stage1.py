"""Stage-1 training and CAM test (tool/stages/stage1.py, 1_train_stage1.py) on tiny synthetic data."""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from network import resnet38_cls
from network.resnet38_cls import CAMClassifier
from tests.compat import FIXTURES, fixture_state_dict, reference_keys
from tool.core.checkpoint import load_checkpoint, read_state_dict
from tool.core.errors import InputError, run_cli
from tool.core.models import classifier_from_state_dict
from tool.data.synth import write_dataset
from tool.method.metrics import ConfusionMatrix
from tool.stages import stage1
from tool.stages.training import poly_lr, set_learning_rate

REPO = Path(__file__).resolve().parents[1]
WIDTH = 0.0625  # 4 channels in conv1a: the full ResNet-38 depth, fast enough for tests

REFERENCE_DEFAULTS = {
    'batch_size': 20, 'max_epoches': 20, 'network': 'network.resnet38_cls', 'lr': 0.01, 'num_workers': 10,
    'wt_dec': 5e-4, 'session_name': 'Stage 1', 'env_name': 'PDA', 'model_name': 'PDA', 'n_class': 4,
    'weights': 'init_weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params', 'trainroot': 'datasets/BCSS-WSSS/train/',
    'testroot': 'datasets/BCSS-WSSS/test/', 'save_folder': 'checkpoints/', 'init_gama': 1, 'dataset': 'bcss'}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('synth') / 'luad'
    write_dataset(str(root), 'luad', 32, {'train': 16, 'val': 3, 'test': 4}, seed=0)
    return root


def tiny_args(data, save_folder, *extra):
    return stage1.get_args_parser().parse_args([
        '--dataroot', str(data), '--dataset', 'luad', '--weights', 'none', '--width', str(WIDTH),
        '--batch_size', '4', '--max_epoches', '3', '--num_workers', '0', '--device', 'cpu',
        '--print_freq', '1', '--save_folder', str(save_folder), *extra])


def run(args):
    return run_cli(stage1.main, args)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope='module')
def trained(data, tmp_path_factory):
    """One 5-epoch tiny run that several tests inspect."""
    folder = tmp_path_factory.mktemp('trained')
    run(tiny_args(data, folder, '--max_epoches', '5'))
    return folder


def test_parser_has_every_reference_flag_with_its_default():
    args = stage1.get_args_parser().parse_args([])
    assert {k: getattr(args, k) for k in REFERENCE_DEFAULTS} == REFERENCE_DEFAULTS
    given = stage1.get_args_parser().parse_args(
        ['--batch_size', '8', '--max_epoches', '2', '--network', 'network.resnet38_cls', '--lr', '0.1',
         '--num_workers', '0', '--wt_dec', '1e-4', '--session_name', 's', '--env_name', 'e', '--model_name', 'm',
         '--n_class', '4', '--weights', 'w.pth', '--trainroot', 'd/train', '--testroot', 'd/test',
         '--save_folder', 'out', '--init_gama', '0.9', '--dataset', 'luad'])
    assert (given.batch_size, given.lr, given.wt_dec, given.init_gama, given.dataset) == (8, 0.1, 1e-4, 0.9, 'luad')
    assert args.momentum is None and args.width == 1.0 and args.device == 'auto' and args.pda_from_epoch == 3


def test_optimizer_groups_and_lrs_follow_the_reference_rule():
    model = CAMClassifier(4, WIDTH, frozen=True)
    args = stage1.get_args_parser().parse_args(['--lr', '0.02', '--wt_dec', '3e-4'])
    optimizer = stage1.make_optimizer(model, args)
    groups = optimizer.param_groups
    assert [g['lr'] for g in groups] == [0.02, 0.04, 0.2, 0.4]
    assert [g['weight_decay'] for g in groups] == [3e-4, 0, 3e-4, 0]
    # the reference's positional mix-up: momentum = weight decay
    assert all(g['momentum'] == 3e-4 for g in groups)
    named = {id(p): n for n, p in model.named_parameters()}
    names = [{named[id(p)] for p in g['params']} for g in groups]
    convs = {n for n, p in model.named_parameters() if p.dim() == 4}
    frozen = {n for n in convs if n.split('.')[0] in ('conv1a', 'b2', 'b2_1', 'b2_2')}
    assert names[0] == convs - frozen - {'fc8.weight'} and names[2] == {'fc8.weight'}
    assert names[1] == set() and names[3] == set()  # the network has no biases; BN is frozen
    args = stage1.get_args_parser().parse_args(['--momentum', '0.9'])
    assert stage1.make_optimizer(model, args).param_groups[0]['momentum'] == 0.9


def test_adam_keeps_the_groups_and_its_fused_steps_equal_the_plain_ones():
    torch.manual_seed(0)
    model = CAMClassifier(4, WIDTH, frozen=False)
    args = stage1.get_args_parser().parse_args(['--optimizer', 'adam', '--lr', '0.0003', '--wt_dec', '3e-4'])
    optimizer = stage1.make_optimizer(model, args)
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults['fused']
    np.testing.assert_allclose([g['lr'] for g in optimizer.param_groups], [0.0003, 0.0006, 0.003, 0.006], rtol=1e-12)
    assert [g['weight_decay'] for g in optimizer.param_groups] == [3e-4, 0, 3e-4, 0]
    # the fused kernel against torch's plain per-tensor Adam on the same groups, five poly steps
    twin, start = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    plain = torch.optim.Adam([{'params': params, 'lr': g['lr'], 'weight_decay': g['weight_decay']}
                              for params, g in zip(twin.parameter_groups(), optimizer.param_groups, strict=True)],
                             fused=False, foreach=False)
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([[1., 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 0]])
    for step in range(5):
        for net, opt in ((model, optimizer), (twin, plain)):
            torch.manual_seed(step)  # the same dropout masks
            set_learning_rate(opt, poly_lr(args.lr, step, 5), stage1.LR_SCALES)
            opt.zero_grad()
            F.multilabel_soft_margin_loss(net(images), labels).backward()
            opt.step()
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # Adam moves a weight by about its rate a step
    assert not torch.equal(model.fc8.weight, start['fc8.weight'])


@pytest.mark.parametrize('scale', [1.0, 0.5, 0.0])
def test_dropout_scale_multiplies_the_three_reference_rates_and_leaves_the_weights(scale):
    args = stage1.get_args_parser().parse_args(['--weights', 'none', '--width', str(WIDTH),
                                                '--dropout_scale', str(scale)])
    model, _ = stage1.make_model(args)
    rates = {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout2d)}
    assert rates == {'b6.dropout_2b1': 0.3 * scale, 'b6.dropout_2b2': 0.3 * scale,
                     'b7.dropout_2b1': 0.5 * scale, 'b7.dropout_2b2': 0.5 * scale, 'dropout7': 0.5 * scale}
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in CAMClassifier(4, WIDTH, frozen=False).state_dict().items()}
    if scale == 0:  # no dropout: training-mode logits are the same on every pass
        images = torch.rand(2, 3, 32, 32)
        model.train()
        torch.testing.assert_close(model(images), model(images))


@pytest.mark.parametrize('scale', ['-0.5', '2.5'])
def test_a_dropout_scale_that_makes_no_probability_stops_with_one_line(data, tmp_path, capsys, scale):
    with pytest.raises(SystemExit) as stop:
        run(tiny_args(data, tmp_path, '--dropout_scale', scale))
    assert stop.value.code == 2
    assert f'--dropout_scale {float(scale):g}: must be between 0 and 2' in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_poly_schedule_per_iteration():
    model = CAMClassifier(4, WIDTH, frozen=False)
    args = stage1.get_args_parser().parse_args(['--lr', '0.01', '--max_epoches', '2'])
    optimizer = stage1.make_optimizer(model, args)
    max_step = 5 * args.max_epoches  # 5 iterations an epoch
    seen = []
    for step in range(10):
        set_learning_rate(optimizer, poly_lr(args.lr, step, max_step), stage1.LR_SCALES)  # as train_one_epoch
        seen.append([g['lr'] for g in optimizer.param_groups])
        optimizer.step()
    set_learning_rate(optimizer, poly_lr(args.lr, max_step, max_step), stage1.LR_SCALES)
    expected = [[base * (1 - k / 10) ** 0.9 for base in (0.01, 0.02, 0.1, 0.2)] for k in range(10)]
    np.testing.assert_allclose(seen, expected, rtol=1e-12)
    assert optimizer.param_groups[0]['lr'] == 0.0


def test_training_run_writes_everything_and_schedules_pda(trained):
    records = read_jsonl(trained / 'metrics.jsonl')
    epochs = [r for r in records if 'epoch_loss' in r]
    steps = [r for r in records if 'loss' in r]
    assert [r['pda'] for r in epochs] == [False, False, False, True, True]
    gammas = [1.0]
    for _ in range(4):
        gammas.append(gammas[-1] * 0.98)
    np.testing.assert_allclose([r['gamma'] for r in epochs], gammas, rtol=1e-12)
    assert [r['step'] for r in steps] == list(range(20))  # 16 patches // 4 per batch x 5 epochs
    assert all(r['pda'] == (r['epoch'] >= 3) for r in steps)
    np.testing.assert_allclose([r['lr'] for r in steps], [0.01 * (1 - k / 20) ** 0.9 for k in range(20)])
    for r in steps:
        assert math.isfinite(r['loss']) and 0 <= r['exact_match'] <= 1 and 0 <= r['jaccard'] <= 1
    resume = load_checkpoint(str(trained / 'stage1_resume.pth'))
    assert (resume['epoch'], resume['step']) == (4, 20)
    assert resume['gamma'] == pytest.approx(gammas[-1] * 0.98)
    # the final weights load into the reference's key layout, BatchNorm statistics included
    keys = set(reference_keys('stage1_resnet38_cls'))
    state_dict = read_state_dict(str(trained / 'stage1_checkpoint_trained_on_luad.pth'))
    assert set(state_dict) == keys
    assert json.load(open(trained / 'stage1_args.json'))['args']['width'] == WIDTH


def test_pda_starts_at_the_epoch_given(data, tmp_path):
    """--pda_from_epoch moves the start of PDA and nothing else of the schedule: gamma still decays
    from the first epoch, as the reference's does."""
    run(tiny_args(data, tmp_path, '--pda_from_epoch', '2'))
    epochs = [r for r in read_jsonl(tmp_path / 'metrics.jsonl') if 'epoch_loss' in r]
    assert [r['pda'] for r in epochs] == [False, False, True]
    np.testing.assert_allclose([r['gamma'] for r in epochs], [1.0, 0.98, 0.98 ** 2], rtol=1e-12)


def test_exact_match_and_jaccard_of_label_sets():
    logits = torch.tensor([[2.0, -1, -1, 3], [2.0, 1, -1, -3], [-1.0, -1, -1, -1]])
    labels = torch.tensor([[1.0, 0, 0, 1], [1.0, 0, 1, 0], [0.0, 0, 1, 1]])
    exact, jaccard = stage1.label_set_agreement(logits, labels)
    assert exact.item() == pytest.approx(1 / 3)
    assert jaccard.item() == pytest.approx((1 + 1 / 3 + 0) / 3)


def reference_cam_prediction(model, image_path):
    """The reference's test phase for one patch, step by step in numpy (tool/infer_fun.infer)."""
    image = np.asarray(Image.open(image_path).convert('RGB'))
    x = torch.from_numpy(image.transpose(2, 0, 1).copy()).float()[None] / 255
    with torch.no_grad():
        cam, logits = model.forward_cam(x)
        y = torch.sigmoid(logits)[0].numpy()
        label = np.array([1.0 if p > 0.25 else 0.0 for p in y], dtype=np.float32)
        cam = F.interpolate(cam, image.shape[:2], mode='bilinear', align_corners=False)[0].numpy()
    cam = cam * label.reshape(4, 1, 1)
    norm = (cam - cam.min()) / (cam.max() - cam.min())
    scores = np.zeros_like(norm)
    scores[label > 0] = norm[label > 0]
    return np.argmax(scores, axis=0)


@pytest.mark.parametrize('split', ['val', 'test'])
def test_test_phase_equals_a_direct_recomputation(trained, data, split):
    """The CAMs are scored on val (what a recipe is chosen by), then on test, by the same rule."""
    report = json.load(open(trained / f'stage1_{split}_metrics.json'))
    model = classifier_from_state_dict(read_state_dict(str(trained / 'stage1_checkpoint_trained_on_luad.pth'))).eval()
    confusion = ConfusionMatrix(4)
    names = sorted(os.listdir(data / split / 'img'))
    for name in names:
        truth = np.array(Image.open(data / split / 'mask' / name))
        confusion.update(truth, reference_cam_prediction(model, data / split / 'img' / name))
    scores = confusion.scores()
    assert report['split'] == split and report['root'] == str(data / split)
    assert report['patches'] == len(names) and report['forced_patches'] == 0
    assert report['miou'] == pytest.approx(scores['miou'], abs=1e-12)
    assert report['fwiou'] == pytest.approx(scores['fwiou'], abs=1e-12)
    iou = [math.nan if v is None else v for v in report['iou'].values()]  # JSON writes NaN (a class in neither) as null
    assert iou == pytest.approx(scores['iou'], abs=1e-12, nan_ok=True)
    # the --test_only path gives the same numbers from the saved checkpoint
    os.remove(trained / f'stage1_{split}_metrics.json')
    run(tiny_args(data, trained, '--test_only', '--weights', str(trained / 'stage1_checkpoint_trained_on_luad.pth')))
    assert json.load(open(trained / f'stage1_{split}_metrics.json'))['miou'] == report['miou']


def test_patch_with_no_class_above_threshold_takes_its_most_probable_class():
    cams = torch.zeros(2, 4, 2, 2)
    cams[0, 2] = torch.tensor([[1.0, 0], [0, 2]])
    cams[0, 0] = 5.0  # large, but class 0 is not present and must not win
    logits = torch.tensor([[-5.0, -3, -2, -4],    # nothing passes 0.25; class 2 is the most probable
                           [3.0, -5, 3, -5]])     # classes 0 and 2 present, CAMs all zero (flat)
    prediction, forced = stage1.cam_segmentation(cams, logits, (4, 4))
    assert forced.tolist() == [True, False]
    up = F.interpolate(cams[:1, 2:3], (4, 4), mode='bilinear', align_corners=False)[0, 0]
    assert torch.equal(prediction[0], torch.where(up > 0, 2, 0))  # zero CAM ties go to class 0 (reference)
    assert (prediction[1] == 0).all()  # flat: the first present class, as the reference's NaN argmax


def test_baselines():
    truth = torch.tensor([[[0, 0, 3], [3, 3, 4]]])
    labels = torch.tensor([[1.0, 0, 0, 1]])
    frequency = torch.tensor([5.0, 9, 1, 2])
    out = stage1.baseline_segmentations(truth, labels, frequency, torch.Generator().manual_seed(0))
    assert (out['most frequent labelled class'] == 0).all()     # 9 is NEC's, but NEC is not in the label
    assert (out['largest labelled class (oracle)'] == 3).all()
    assert out['uniform random class'].shape == truth.shape


def test_missing_weights_exit_2_with_one_line(data, tmp_path):
    result = subprocess.run(
        [sys.executable, '1_train_stage1.py', '--dataroot', str(data), '--dataset', 'luad', '--device', 'cpu',
         '--weights', str(tmp_path / 'missing.params'), '--save_folder', str(tmp_path), '--num_workers', '0',
         '--batch_size', '4'],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count('\n') == 0
    assert 'missing.params: --weights file not found' in result.stderr


def test_weights_none_trains_batchnorm_and_files_freeze_it(tmp_path):
    args = stage1.get_args_parser().parse_args(['--weights', 'none', '--width', str(WIDTH)])
    model, _ = stage1.make_model(args)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not model.frozen and all(m.training and m.weight.requires_grad for m in bns)
    assert all(p.requires_grad for p in model.parameters())
    grouped = {id(p) for g in model.parameter_groups() for p in g}
    assert grouped == {id(p) for p in model.parameters()}

    backbone = {k: v for k, v in CAMClassifier(4, WIDTH).state_dict().items() if not k.startswith('fc8.')}
    torch.save(backbone, tmp_path / 'backbone.pth')
    args = stage1.get_args_parser().parse_args(['--weights', str(tmp_path / 'backbone.pth'), '--width', str(WIDTH)])
    model, how = stage1.make_model(args)
    model.train()
    assert model.frozen and not any(m.training or m.weight.requires_grad
                                    for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.equal(model.b4.conv_branch2a.weight, backbone['b4.conv_branch2a.weight'])
    args = stage1.get_args_parser().parse_args(['--weights', str(tmp_path / 'backbone.pth'), '--width', '0.125'])
    with pytest.raises(InputError, match='width 0.0625'):
        stage1.make_model(args)


def test_resumed_run_ends_exactly_as_an_uninterrupted_one(data, tmp_path, monkeypatch):
    run(tiny_args(data, tmp_path / 'straight'))

    calls = {'n': 0}
    agreement = stage1.label_set_agreement

    def killed_mid_epoch_2(logits, labels):  # called after each optimiser step; 4 steps per epoch
        calls['n'] += 1
        if calls['n'] == 10:
            raise KeyboardInterrupt
        return agreement(logits, labels)

    monkeypatch.setattr(stage1, 'label_set_agreement', killed_mid_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_args(data, tmp_path / 'resumed'))
    monkeypatch.undo()
    with open(tmp_path / 'resumed/metrics.jsonl', 'a') as f:
        f.write('{"epoch": 2, "st')  # a line cut short by the kill
    assert load_checkpoint(str(tmp_path / 'resumed/stage1_resume.pth'))['epoch'] == 1
    run(tiny_args(data, tmp_path / 'resumed', '--resume', 'auto'))

    straight = read_state_dict(str(tmp_path / 'straight/stage1_checkpoint_trained_on_luad.pth'))
    resumed = read_state_dict(str(tmp_path / 'resumed/stage1_checkpoint_trained_on_luad.pth'))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert read_jsonl(tmp_path / 'straight/metrics.jsonl') == read_jsonl(tmp_path / 'resumed/metrics.jsonl')
    scores = [json.load(open(tmp_path / f'{run}/stage1_test_metrics.json')) for run in ('straight', 'resumed')]
    assert [{k: v for k, v in s.items() if k != 'checkpoint'} for s in scores][0] == \
           [{k: v for k, v in s.items() if k != 'checkpoint'} for s in scores][1]


def test_non_finite_loss_stops_naming_epoch_and_step(data, tmp_path, monkeypatch, capsys):
    calls = {'n': 0}
    forward = resnet38_cls.CAMClassifier.forward

    def nan_at_third_step(self, x, enable_pda=False):
        calls['n'] += 1
        logits = forward(self, x, enable_pda)
        return logits * float('nan') if calls['n'] == 3 else logits

    monkeypatch.setattr(resnet38_cls.CAMClassifier, 'forward', nan_at_third_step)
    with pytest.raises(SystemExit) as stop:
        run(tiny_args(data, tmp_path))
    assert stop.value.code == 2
    assert 'epoch 0 step 2: loss is nan' in capsys.readouterr().err
    assert not (tmp_path / 'stage1_resume.pth').exists()


@pytest.mark.slow
def test_full_size_test_phase_reproduces_the_reference_fixture(tmp_path):
    torch.save(fixture_state_dict('stage1_resnet38_cls'), tmp_path / 'stage1.pth')
    fixtures = FIXTURES / 'luad'
    run(stage1.get_args_parser().parse_args(
        ['--test_only', '--weights', str(tmp_path / 'stage1.pth'), '--dataroot', str(fixtures),
         '--dataset', 'luad', '--device', 'cpu', '--num_workers', '0', '--save_folder', str(tmp_path)]))
    report = json.load(open(tmp_path / 'stage1_test_metrics.json'))
    reference = json.load(open(fixtures / 'ref_scores.json'))['stage1_cam']
    assert report['miou'] == pytest.approx(reference['MIoU'], abs=1e-6)
    assert report['fwiou'] == pytest.approx(reference['FwIoU'], abs=1e-6)
