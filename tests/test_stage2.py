"""Stage 2 (tool/stages/stage2.py, tool/method/gate.py) on tiny data: 32 px patches, DeepLab with a ResNet-18
backbone, a ResNet-38 stage-1 classifier at 1/16 width."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch

from network.deeplab import DeepLab
from network.resnet38_cls import CAMClassifier
from tool.core.checkpoint import load_checkpoint
from tool.core.errors import InputError, run_cli
from tool.core.files import save_palette_png, save_png
from tool.data.datasets import DATASETS
from tool.method.gate import gate_classes, gated_prediction
from tool.stages import stage2, training

SIZE = 32
COLOURS = np.array([[180, 30, 30], [30, 180, 30], [30, 30, 180], [200, 200, 40]])  # TE NEC LYM TAS


def patch(rng, classes):
    """A patch split into vertical bands of the given classes, a white background band on the
    right, colour plus noise; its mask."""
    mask = np.full((SIZE, SIZE), 4, np.uint8)
    width = (SIZE - 6) // len(classes)
    for i, c in enumerate(classes):
        mask[:, i * width:(i + 1) * width] = c
    image = np.where(mask[..., None] == 4, 255, COLOURS[np.minimum(mask, 3)])
    image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255)
    return image.astype(np.uint8), mask


def write_dataset(root, n_train=8, n_eval=4):
    rng = np.random.default_rng(0)
    palette = DATASETS['luad'].palette
    combos = [(0,), (1, 2), (2, 3), (0, 3), (1,), (3, 0, 2), (2,), (0, 1)]
    for i in range(n_train):
        classes = combos[i % len(combos)]
        image, mask = patch(rng, classes)
        label = ' '.join('1' if c in classes else '0' for c in range(4))
        name = f'p{i:02d}-[{label}].png'
        save_png(image, os.path.join(root, 'train', name))
        save_palette_png(mask, palette, os.path.join(root, 'train_gt', name))
        for layer in ('bn7', 'b5_2', 'b4_5'):
            save_palette_png(mask, palette, os.path.join(root, 'train_PM', f'PM_{layer}', name))
    for split in ('val', 'test'):
        for i in range(n_eval):
            image, mask = patch(rng, combos[(i + 3) % len(combos)])
            save_png(image, os.path.join(root, split, 'img', f'{split}{i}.png'))
            save_palette_png(mask, DATASETS['luad'].palette, os.path.join(root, split, 'mask', f'{split}{i}.png'))


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('stage2_data')
    write_dataset(str(root))
    torch.manual_seed(0)
    stage1 = root / 'stage1.pth'
    torch.save(CAMClassifier(n_class=4, width=1 / 16).state_dict(), stage1)
    return root, stage1


def parse(*argv):
    return stage2.get_args_parser().parse_args([str(a) for a in argv])


def tiny_args(root, savepath, *extra):
    return parse('--dataset', 'luad', '--dataroot', root, '--savepath', savepath, '--backbone', 'resnet18',
                 '--resume', 'none', '--epochs', 2, '--batch-size', 4, '--workers', 0, '--lr', 0.01,
                 '--device', 'cpu', *extra)


# ---- command line ------------------------------------------------------------------------------

REFERENCE_DEFAULTS = {
    'backbone': 'resnet', 'out_stride': 16, 'Is_GM': True, 'dataroot': 'datasets/BCSS-WSSS/', 'dataset': 'bcss',
    'savepath': 'checkpoints/', 'workers': 10, 'sync_bn': None, 'freeze_bn': False, 'loss_type': 'ce',
    'n_class': 4, 'epochs': 30, 'batch_size': 20, 'lr': 0.01, 'lr_scheduler': 'poly', 'momentum': 0.9,
    'weight_decay': 5e-4, 'nesterov': False, 'no_cuda': False, 'gpu_ids': '0', 'seed': 1,
    'resume': 'init_weights/deeplab-resnet.pth.tar', 'checkname': 'deeplab-resnet', 'ft': False, 'eval_interval': 1,
}


def test_parser_has_every_reference_flag_with_its_default():
    args = vars(parse())
    assert {k: args[k] for k in REFERENCE_DEFAULTS} == REFERENCE_DEFAULTS
    assert args['pm_weights'] == (0.6, 0.2, 0.2) and args['supervision'] == 'multilayer'
    assert args['resume_stage1'] is None and args['resume_state'] is None and args['device'] == 'auto'
    assert not args['amp'] and not args['test_only'] and not args['debug']
    # every reference flag is accepted with a value of the reference's form
    parse('--backbone', 'mobilenet', '--out-stride', 8, '--Is_GM', 'True', '--dataroot', 'd', '--dataset', 'luad',
          '--savepath', 's', '--workers', 2, '--sync-bn', 'False', '--freeze-bn', 'False', '--loss-type', 'focal',
          '--n_class', 4, '--epochs', 1, '--batch-size', 2, '--lr', 0.1, '--lr-scheduler', 'cos', '--momentum', 0.5,
          '--weight-decay', 0, '--nesterov', '--no-cuda', '--gpu-ids', '0,1', '--seed', 3, '--resume', 'x.pth',
          '--checkname', 'c', '--ft', '--eval-interval', 2)


@pytest.mark.parametrize('text,value', [('False', False), ('True', True), ('0', False), ('1', True),
                                        ('no', False), ('yes', True), ('false', False)])
def test_booleans_parse_as_written(text, value):
    # the reference's type=bool read '--Is_GM False' as True
    args = parse('--Is_GM', text, '--sync-bn', text, '--freeze-bn', text)
    assert args.Is_GM is value and args.sync_bn is value and args.freeze_bn is value


def test_bad_boolean_and_bad_weights_are_rejected():
    for argv in (('--Is_GM', 'maybe'), ('--pm_weights', '0.6,0.4'), ('--pm_weights', '1,a,2'), ('--pm_weights', '1,-1,0')):
        with pytest.raises(SystemExit):
            parse(*argv)
    assert parse('--pm_weights', '1,0,0.5').pm_weights == (1.0, 0.0, 0.5)


def test_no_cuda_means_cpu():
    args = parse('--no-cuda', '--device', 'auto')
    device, amp_dtype = stage2.setup(args)
    assert device == torch.device('cpu') and args.device == 'cpu' and amp_dtype is None
    assert args.sync_bn is False  # default None: on only for several GPUs


# ---- optimiser and schedule --------------------------------------------------------------------

def test_optimizer_groups_are_backbone_1x_and_head_10x():
    model = DeepLab('resnet18', 16, 4)
    args = parse('--lr', 0.02, '--nesterov')
    optimizer = stage2.make_optimizer(model, args)
    ids = lambda params: {id(p) for p in params}
    g1, g10 = optimizer.param_groups
    assert ids(g1['params']) == ids(model.backbone.parameters())
    assert ids(g10['params']) == ids(list(model.aspp.parameters()) + list(model.decoder.parameters()))
    assert (g1['lr'], g10['lr']) == (0.02, pytest.approx(0.2))
    assert g1['momentum'] == 0.9 and g1['weight_decay'] == 5e-4 and g1['nesterov']

    # the reference's LR_Scheduler: poly (1 - T/N)^0.9 per iteration, no warm-up; head 10x
    assert stage2.learning_rate(args, 0, 100) == 0.02
    assert stage2.learning_rate(args, 37, 100) == pytest.approx(0.02 * (1 - 0.37) ** 0.9)
    training.set_learning_rate(optimizer, 0.005, stage2.LR_SCALES)
    assert (g1['lr'], g10['lr']) == (0.005, 0.05)
    cos = parse('--lr', 0.02, '--lr-scheduler', 'cos')
    assert stage2.learning_rate(cos, 25, 100) == pytest.approx(0.01 * (1 + math.cos(math.pi / 4)))


def test_init_file_with_numpy_scalars_and_another_class_count(tmp_path):
    torch.manual_seed(0)
    voc = DeepLab('resnet18', 16, num_classes=21)
    path = tmp_path / 'deeplab-resnet.pth.tar'
    torch.save({'state_dict': voc.state_dict(), 'optimizer': {}, 'epoch': np.int64(50),
                'best_pred': np.float64(0.78)}, path)
    model = stage2.make_model(parse('--backbone', 'resnet18', '--resume', path))
    own, init = model.state_dict(), voc.state_dict()
    assert all(torch.equal(own[k], init[k]) for k in own if not k.startswith('decoder.last_conv.8.'))
    assert own['decoder.last_conv.8.weight'].shape[0] == 4


# ---- data and input errors ---------------------------------------------------------------------

def test_supervision_picks_the_mask_folders(data, tmp_path):
    root, _ = data
    for supervision, k in (('multilayer', 3), ('bn7', 1), ('gt', 1)):
        args = tiny_args(root, tmp_path, '--supervision', supervision)
        stage2.setup(args)
        batch = next(iter(stage2.make_train_loader(args)))
        assert batch['masks'].shape == (4, k, SIZE, SIZE) and batch['image'].shape == (4, 3, SIZE, SIZE)
        assert stage2.supervision_weights(args) == ((0.6, 0.2, 0.2) if k == 3 else (1.0,))


@pytest.mark.parametrize('flags', [('--width', '0'), ('--backbone', 'mobilenet', '--width', '0.5')])
def test_width_that_no_model_has_is_an_input_error(flags, tmp_path):
    with pytest.raises(InputError, match=f'--width {flags[-1]}: must be above 0, and 1 with --backbone mobilenet'):
        stage2.setup(stage2.get_args_parser().parse_args(['--device', 'cpu', *flags]))


def test_missing_pseudo_masks_exit_2_with_one_line(tmp_path, capsys):
    root = tmp_path / 'data'
    write_dataset(str(root), n_train=2, n_eval=1)
    os.rename(root / 'train_PM', root / 'elsewhere')
    with pytest.raises(SystemExit) as exit_info:
        run_cli(stage2.main, tiny_args(root, tmp_path / 'out'))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(root / 'train_PM' / 'PM_bn7') in err and '2_generate_PM.py' in err


def test_pseudo_mask_of_another_size_is_an_input_error(tmp_path):
    root = tmp_path / 'data'
    write_dataset(str(root), n_train=2, n_eval=1)
    bad = root / 'train_PM' / 'PM_b5_2' / sorted(os.listdir(root / 'train'))[1]
    save_palette_png(np.zeros((SIZE, SIZE + 1)), DATASETS['luad'].palette, str(bad))
    args = tiny_args(root, tmp_path / 'out')
    stage2.setup(args)
    with pytest.raises(InputError, match=re.escape(f'{bad}: mask is 33x32 but the image is 32x32')):
        stage2.make_train_loader(args)


# ---- gate ----------------------------------------------------------------------------------------

def test_gate_modes_on_hand_built_logits():
    # one image, 3 pixels, 4 classes; the classifier says only classes 0 and 2 are present
    stage1_logits = torch.tensor([[2.0, -3.0, math.log(0.2 / 0.8), -2.1]])  # sigmoid: .88, .05, .2, .109
    present = gate_classes(stage1_logits)
    assert present.tolist() == [[True, False, True, True]]
    present = torch.tensor([[True, False, True, False]])
    logits = torch.tensor([[[1.0, -1.0, -2.0],    # class 0
                            [5.0, 3.0, -0.5],     # class 1 (absent)
                            [0.5, 2.0, -3.0],     # class 2
                            [0.0, 0.0, -1.0]]])[..., None]  # class 3 (absent); shape (1, 4, 3, 1)
    assert logits.argmax(1).flatten().tolist() == [1, 1, 1]
    # multiply: absent logits become 0, so where every present logit is negative an absent class
    # (the first of them, class 1) wins: the reference's quirk
    assert gated_prediction(logits, present, 'multiply').flatten().tolist() == [0, 2, 1]
    # mask: only present classes can win
    assert gated_prediction(logits, present, 'mask').flatten().tolist() == [0, 2, 0]
    # nothing present: mask leaves the image ungated, multiply gives all-zero logits -> class 0
    none = torch.zeros(1, 4, dtype=torch.bool)
    assert gated_prediction(logits, none, 'mask').flatten().tolist() == [1, 1, 1]
    assert gated_prediction(logits, none, 'multiply').flatten().tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        gated_prediction(logits, present, 'other')


# ---- training, resume, test --------------------------------------------------------------------

class Interrupt(Exception):
    pass


def test_resumed_run_equals_uninterrupted_run(data, tmp_path, monkeypatch):
    root, stage1 = data
    full = tmp_path / 'full'
    scores = stage2.main(tiny_args(root, full, '--resume_stage1', stage1))

    # the same run, stopped when the second epoch begins, then continued with --resume_state auto
    parts = tmp_path / 'parts'
    train_one_epoch = stage2.train_one_epoch

    def stop_at_epoch_1(model, optimizer, loader, device, epoch, *rest):
        if epoch == 1:
            raise Interrupt
        return train_one_epoch(model, optimizer, loader, device, epoch, *rest)

    monkeypatch.setattr(stage2, 'train_one_epoch', stop_at_epoch_1)
    with pytest.raises(Interrupt):
        stage2.main(tiny_args(root, parts, '--resume_stage1', stage1))
    assert load_checkpoint(str(parts / 'stage2_resume.pth'))['epoch'] == 1
    monkeypatch.setattr(stage2, 'train_one_epoch', train_one_epoch)
    resumed = stage2.main(tiny_args(root, parts, '--resume_stage1', stage1, '--resume_state', 'auto'))

    for name in ('stage2_checkpoint_trained_on_luad.pth', 'stage2_resume.pth'):
        a, b = load_checkpoint(str(full / name)), load_checkpoint(str(parts / name))
        weights = 'state_dict' if 'state_dict' in a else 'model'
        assert a['epoch'] == b['epoch'] and a['best_pred'] == b['best_pred']
        assert all(torch.equal(a[weights][k], b[weights][k]) for k in a[weights])
    assert scores == resumed
    records = lambda path: [json.loads(line) for line in open(path)]
    val = lambda path: [r for r in records(path) if r.get('split') == 'val']
    assert val(full / 'metrics.jsonl') == val(parts / 'metrics.jsonl') and len(val(full / 'metrics.jsonl')) == 2
    steps = [r for r in records(full / 'metrics.jsonl') if 'loss' in r]
    assert [r['step'] for r in steps] == list(range(4))  # 8 patches, batch 4: 2 steps x 2 epochs
    assert steps[0]['lr'] == 0.01 and steps[3]['lr'] == pytest.approx(0.01 * (1 / 4) ** 0.9)
    starts = [r for r in records(parts / 'metrics.jsonl') if r.get('event') == 'start']
    assert [r['start_epoch'] for r in starts] == [0, 1]

    # the best checkpoint: {state_dict, optimizer, epoch, best_pred, args}, best_pred = best val MIoU
    best = load_checkpoint(str(full / 'stage2_checkpoint_trained_on_luad.pth'))
    assert set(best) == {'state_dict', 'optimizer', 'epoch', 'best_pred', 'args', 'input'}
    assert best['best_pred'] == max(r['miou'] for r in val(full / 'metrics.jsonl'))
    assert best['args']['backbone'] == 'resnet18'

    # test_metrics.json: every mode with MIoU, FwIoU, accuracy and per-class IoU by class name
    report = json.loads((full / 'test_metrics.json').read_text())
    assert list(report['modes']) == ['no_gate', 'gate_multiply', 'gate_mask']
    for mode, s in report['modes'].items():
        assert set(s) >= {'miou', 'fwiou', 'acc', 'iou'} and list(s['iou']) == ['TE', 'NEC', 'LYM', 'TAS']
        assert s['miou'] == pytest.approx(scores[mode]['miou'], nan_ok=True)
    assert report['stage1_checkpoint'] == str(stage1)

    # --test_only with the best checkpoint: architecture from the weights (--backbone left at
    # 'resnet'), the same numbers as the test at the end of training
    out = tmp_path / 'test_only'
    only = stage2.main(parse('--test_only', '--dataset', 'luad', '--dataroot', root, '--savepath', out, '--workers', 0,
                             '--device', 'cpu', '--resume', full / 'stage2_checkpoint_trained_on_luad.pth',
                             '--resume_stage1', stage1))
    assert only == scores and (out / 'test_metrics.json').is_file()
    # without a usable gate only the plain row
    plain = stage2.main(parse('--test_only', '--dataset', 'luad', '--dataroot', root, '--savepath', out, '--workers', 0,
                              '--device', 'cpu', '--resume', full / 'stage2_checkpoint_trained_on_luad.pth',
                              '--resume_stage1', stage1, '--Is_GM', 'False'))
    assert list(plain) == ['no_gate'] and plain['no_gate'] == scores['no_gate']


def test_the_gate_changes_no_weight_of_training(data, tmp_path):
    """The gate is a test-time device: loading its classifier first (--resume_stage1) draws nothing
    from the random stream that initialises and shuffles stage 2, so the same seed trains the same
    weights with and without it."""
    root, stage1 = data
    gated = stage2.main(tiny_args(root, tmp_path / 'gate', '--resume_stage1', stage1))
    plain = stage2.main(tiny_args(root, tmp_path / 'plain', '--Is_GM', 'False'))
    weights = [load_checkpoint(str(tmp_path / run / 'stage2_checkpoint_trained_on_luad.pth'))['state_dict']
               for run in ('gate', 'plain')]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert gated['no_gate'] == plain['no_gate'] and list(plain) == ['no_gate']


def test_test_only_refuses_an_initialisation_file(data, tmp_path):
    root, _ = data
    path = tmp_path / 'voc.pth'
    torch.save({'state_dict': DeepLab('resnet18', 16, num_classes=21).state_dict()}, path)
    with pytest.raises(InputError, match='21 classes'):
        stage2.main(parse('--test_only', '--dataset', 'luad', '--dataroot', root, '--savepath', tmp_path,
                          '--workers', 0, '--device', 'cpu', '--resume', path, '--Is_GM', 'False'))


def test_training_learns_the_tiny_data(data, tmp_path):
    """From random init, 32 steps on 8 colour-band patches: the test patches are segmented well
    above a constant prediction (MIoU ~0.1); seeds 1-4 gave 0.46-0.68. One loss record per step."""
    root, _ = data
    scores = stage2.main(tiny_args(root, tmp_path, '--epochs', 8, '--batch-size', 2, '--lr', 0.005, '--Is_GM', 'False'))
    losses = [json.loads(line)['loss'] for line in open(tmp_path / 'metrics.jsonl') if '"loss"' in line]
    assert len(losses) == 32 and all(math.isfinite(v) for v in losses)
    assert scores['no_gate']['miou'] > 0.35
    # what inference needs to show the model what it learnt on
    best = torch.load(tmp_path / 'stage2_checkpoint_trained_on_luad.pth', weights_only=True)
    assert best['input'] == {'patch_size': [32, 32], 'mpp': 1.0}
