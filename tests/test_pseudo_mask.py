"""The pseudo-mask rule, the LUAD background, and the 2_generate_PM.py command line."""
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from network.resnet38_cls import CAMClassifier
from tests.compat import FIXTURES
from tool.core.checkpoint import read_state_dict, save_checkpoint
from tool.core.errors import InputError, run_cli
from tool.core.models import classifier_from_state_dict
from tool.data.datasets import DATASETS
from tool.data.patches import parse_label, read_mask, read_rgb
from tool.data.synth import write_dataset
from tool.method.dihedral import TRANSFORMS, mean_over_symmetries
from tool.method.gradcam import multi_layer_grad_cam
from tool.method.metrics import ConfusionMatrix
from tool.method.pseudo_mask import background_mask, normalise, pseudo_mask
from tool.stages import pseudo_masks

LAYERS = ('b4_5', 'b5_2', 'bn7')


# ---- the rule on hand-built arrays ---------------------------------------------------------------

def stack(*maps):
    return np.array(maps, dtype=np.float32)[:, None, :]  # (classes, 1, W)


def test_joint_min_max_spans_all_classes():
    cams = stack([0, 2, 4], [-4, 0, 4], [1, 1, 1], [0, 0, 0])
    expected = (cams + 4) / 8
    np.testing.assert_array_equal(normalise(cams), expected)
    assert normalise(cams).dtype == np.float32  # the reference normalises in the CAMs' precision


def test_absent_classes_are_zeroed_but_still_set_the_range():
    # class 0 is absent: its high map never wins. Present class 2 is at the global minimum in pixel 0,
    # so it normalises to 0 there and ties with the zeroed absent classes: the lowest index, 0, wins
    cams = stack([9, 9], [5, 5], [0, 3], [5, 5])
    label = np.array([0, 0, 1, 0])
    assert pseudo_mask(cams, label).tolist() == [[0, 2]]
    # an absent class lower than everything moves the minimum: class 2 is above 0 everywhere
    cams[3, 0, 0] = -1
    assert pseudo_mask(cams, label).tolist() == [[2, 2]]


def test_ties_go_to_the_lowest_index():
    cams = stack([0, 5, 7], [0, 5, 7], [0, 5, 7], [9, 5, 1])
    assert pseudo_mask(cams, np.array([0, 1, 1, 1])).tolist() == [[3, 1, 1]]


def test_all_zero_pixel_becomes_class_0_even_if_absent():
    # pixel 1: present classes 1 and 3 both at the global minimum, every channel 0
    cams = stack([7, 7], [2, 0], [7, 7], [3, 0])
    assert pseudo_mask(cams, np.array([0, 1, 0, 1])).tolist() == [[3, 0]]


def test_background_beats_a_normalised_one():
    cams = stack([0, 1, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0])
    background = np.array([[False, True, False]])
    assert pseudo_mask(cams, np.array([1, 0, 0, 0]), background).tolist() == [[0, 4, 0]]
    # without a background channel (bcss) the same pixel stays tissue
    assert pseudo_mask(cams, np.array([1, 0, 0, 0]), None).tolist() == [[0, 0, 0]]


def test_constant_maps_give_the_first_present_class_everywhere():
    # max == min: 0/0 = NaN, and NumPy's argmax returns the first NaN, even over the background
    cams = np.full((4, 2, 2), 3.5, dtype=np.float32)
    background = np.array([[True, False], [False, True]])
    with np.errstate(all='raise'):  # no warning escapes
        mask = pseudo_mask(cams, np.array([0, 1, 0, 1]), background)
    assert mask.tolist() == [[1, 1], [1, 1]]


def test_label_may_be_a_tensor_and_output_is_uint8():
    cams = stack([0, 1], [1, 0], [0, 0], [0, 0])
    mask = pseudo_mask(cams, torch.tensor([1., 1., 0., 0.]))
    assert mask.dtype == np.uint8 and mask.tolist() == [[1, 0]]


# ---- the LUAD background -----------------------------------------------------------------------

def fixed_point_grayscale(rgb):
    """The grayscale background_mask used before OpenCV's: Rec. 601 weights 0.299, 0.587, 0.114 in
    15-bit fixed point, rounded (16384 = one half), as OpenCV 3.4 to 5 compute RGB2GRAY."""
    rgb = np.asarray(rgb, dtype=np.int32)
    return ((rgb[..., 0] * 9798 + rgb[..., 1] * 19235 + rgb[..., 2] * 3735 + 16384) >> 15).astype(np.uint8)


def scipy_background_mask(rgb):
    """background_mask as it was before OpenCV: scipy's labelling (its default structure is the
    4-connected cross)."""
    components, _ = ndimage.label(fixed_point_grayscale(rgb) > 200)
    keep = np.bincount(components.ravel()) >= 50
    keep[0] = False
    return keep[components]


def test_opencv_grayscale_is_the_fixed_point_formula_on_every_colour():
    # the reference thresholds OpenCV's gray: any other rounding would move the white rule's border
    every = np.arange(2 ** 24, dtype=np.uint32)
    colours = np.stack([every >> 16, (every >> 8) & 255, every & 255], -1).astype(np.uint8).reshape(4096, 4096, 3)
    np.testing.assert_array_equal(cv2.cvtColor(colours, cv2.COLOR_RGB2GRAY), fixed_point_grayscale(colours))


@pytest.mark.parametrize('seed', range(3))
def test_background_mask_is_the_scipy_rule_it_replaced(seed):
    # white blobs of every size around the 50-pixel limit, touching at corners, on colours near gray 200
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.standard_normal((300, 400)).astype(np.float32), (0, 0), 1 + seed)
    rgb = rng.integers(170, 215, (300, 400, 3), dtype=np.uint8)
    rgb[noise > np.quantile(noise, 0.7)] = 255
    mask = background_mask(rgb)
    white = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) > 200
    assert 0.1 < mask.mean() < white.mean()  # large white regions kept, small ones dropped
    np.testing.assert_array_equal(mask, scipy_background_mask(rgb))


def test_white_threshold_is_strictly_above_200():
    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[:, :10] = 200  # gray 200: tissue
    rgb[:, 10:] = 201  # gray 201: white
    assert not background_mask(rgb)[:, :10].any() and background_mask(rgb)[:, 10:].all()


def test_small_white_components_are_tissue_with_4_connectivity():
    rgb = np.zeros((40, 40, 3), np.uint8)
    white = np.zeros((40, 40), bool)
    white[1:8, 1:8] = True        # 49 px: removed
    white[1:6, 20:30] = True      # 50 px: kept
    white[20:25, 1:6] = True      # two 25 px squares touching only at a corner: 4-connectivity
    white[25:30, 6:11] = True     # keeps them apart, so both are removed (8-connectivity would join them)
    white[30:40, 30:35] = True    # 50 px at the border: kept
    rgb[white] = 255
    expected = np.zeros_like(white)
    expected[1:6, 20:30] = expected[30:40, 30:35] = True
    np.testing.assert_array_equal(background_mask(rgb), expected)


# ---- the reference's own CAMs give the reference's PNGs ---------------------------------------

@pytest.mark.parametrize('layer', LAYERS)
def test_rule_on_reference_cams_reproduces_reference_masks(layer):
    reference = np.load(FIXTURES / 'luad' / 'ref_stage1.npz')
    for name in sorted(os.listdir(FIXTURES / 'luad' / 'train')):
        rgb = read_rgb(FIXTURES / 'luad' / 'train' / name)
        cams = reference[f'{name[:-4]}|gradcam_{layer}']
        mask = pseudo_mask(cams, parse_label(name, 'luad'), background_mask(rgb))
        np.testing.assert_array_equal(mask, read_mask(FIXTURES / 'luad' / 'ref_train_PM' / f'PM_{layer}' / name))


def test_rule_on_reference_cams_reproduces_the_bcss_mask():
    # the bcss fixture patch is the same crop as luad's IHC-288-200, with a bcss-style label
    name = 'IHC_xmin200_ymin288+0[1101].png'
    assert np.array_equal(read_rgb(FIXTURES / 'bcss' / 'train' / name),
                          read_rgb(FIXTURES / 'luad' / 'train' / 'IHC-288-200-[1 0 1 1].png'))
    cams = np.load(FIXTURES / 'luad' / 'ref_stage1.npz')['IHC-288-200-[1 0 1 1]|gradcam_bn7']
    mask = pseudo_mask(cams, parse_label(name, 'bcss'), None)
    np.testing.assert_array_equal(mask, read_mask(FIXTURES / 'bcss' / 'ref_train_PM' / 'PM_bn7' / name))


# ---- the command line -------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_setup(tmp_path_factory):
    """A 5-patch synthetic luad dataset (64 px, with train_gt/) and a width-0.125 checkpoint."""
    root = tmp_path_factory.mktemp('pm')
    write_dataset(str(root / 'synth'), 'luad', 64, {'train': 5, 'val': 3, 'test': 1}, seed=3)
    torch.manual_seed(0)
    model = CAMClassifier(n_class=4, width=0.125)
    for m in model.modules():  # BatchNorm away from identity, so the maps are not trivial
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    save_checkpoint(model.state_dict(), str(root / 'tiny.pth'))
    return root


def run(root, out, *extra):
    args = pseudo_masks.get_args_parser().parse_args(
        ['--weights', str(root / 'tiny.pth'), '--dataroot', str(root / 'synth'), '--dataset', 'luad',
         '--num_workers', '0', '--device', 'cpu', '--batch_size', '2', '--out', str(out), *extra])
    return pseudo_masks.main(args)


def mtimes(out):
    """A file's identity: atomic writes replace the file, so a rewrite changes inode and time."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in Path(out).glob('PM_*/*.png')}


def test_cli_writes_reference_masks_named_like_the_patches(tiny_setup, tmp_path, capsys):
    root, out = tiny_setup, tmp_path / 'train_PM'
    run(root, out, '--save_cam', '--batch_size', '1')  # float32 rounding depends a little on the batch
    names = sorted(os.listdir(root / 'synth' / 'train'))
    model = classifier_from_state_dict(read_state_dict(str(root / 'tiny.pth'))).eval()
    for name in names:
        rgb = read_rgb(root / 'synth' / 'train' / name)
        cams = multi_layer_grad_cam(model, torch.from_numpy(rgb.transpose(2, 0, 1) / np.float32(255))[None])
        for layer in LAYERS:
            image = Image.open(out / f'PM_{layer}' / name)
            assert image.mode == 'P' and image.getpalette()[:15] == DATASETS['luad'].palette
            expected = pseudo_mask(cams[layer][0].numpy(), parse_label(name, 'luad'), background_mask(rgb))
            np.testing.assert_array_equal(np.array(image), expected)
        n_present = int(parse_label(name, 'luad').sum())
        picture = Image.open(out / 'cam_vis' / f'{name[:-4]}_bn7.png')
        assert picture.size == ((2 + n_present) * 64, 64)
    assert sorted(os.listdir(out / 'PM_bn7')) == names
    assert not [p for p in out.rglob('*') if p.name.startswith('.')]  # no temporary files left

    # the metrics JSON is the confusion of the written masks against train_gt
    record = json.loads((out / 'pseudo_mask_metrics.json').read_text())
    assert record['patches'] == 5 and set(record['layers']) == set(LAYERS) and 'majority' in record
    for layer in LAYERS:
        matrix = ConfusionMatrix(4)
        for name in names:
            matrix.update(read_mask(root / 'synth' / 'train_gt' / name), read_mask(out / f'PM_{layer}' / name))
        assert record['layers'][layer]['miou'] == pytest.approx(matrix.scores()['miou'])
    assert 'PM_b4_5' in capsys.readouterr().out


def test_cli_val_split_labels_each_patch_with_the_classes_in_its_mask(tiny_setup, tmp_path):
    """--split val: the same rule on the val patches, their label the classes their mask holds
    (as a training patch's label lists the classes it holds), scored against val/mask."""
    root, out = tiny_setup, tmp_path / 'val_PM'
    run(root, out, '--split', 'val', '--batch_size', '1')
    names = sorted(os.listdir(root / 'synth' / 'val' / 'img'))
    model = classifier_from_state_dict(read_state_dict(str(root / 'tiny.pth'))).eval()
    record = json.loads((out / 'pseudo_mask_metrics.json').read_text())
    assert (record['split'], record['truth'], record['patches']) == ('val', 'val/mask', len(names))
    for layer in LAYERS:
        assert sorted(os.listdir(out / f'PM_{layer}')) == names
        matrix = ConfusionMatrix(4)
        for name in names:
            rgb = read_rgb(root / 'synth' / 'val' / 'img' / name)
            truth = read_mask(root / 'synth' / 'val' / 'mask' / name)
            label = np.array([(truth == c).any() for c in range(4)], np.float32)
            cams = multi_layer_grad_cam(model, torch.from_numpy(rgb.transpose(2, 0, 1) / np.float32(255))[None])
            expected = pseudo_mask(cams[layer][0].numpy(), label, background_mask(rgb))
            mask = read_mask(out / f'PM_{layer}' / name)
            np.testing.assert_array_equal(mask, expected)
            assert set(np.unique(mask)) <= {*np.flatnonzero(label), 4}  # no class outside the mask's
            matrix.update(truth, mask)
        assert record['layers'][layer]['miou'] == pytest.approx(matrix.scores()['miou'])


def test_cli_tta_d4_makes_the_masks_of_the_mean_over_the_eight_symmetries(tiny_setup, tmp_path):
    root, out = tiny_setup, tmp_path / 'train_PM'
    run(root, out, '--tta', 'd4', '--batch_size', '1')
    model = classifier_from_state_dict(read_state_dict(str(root / 'tiny.pth'))).eval()
    changed = 0
    for name in sorted(os.listdir(root / 'synth' / 'train')):
        rgb = read_rgb(root / 'synth' / 'train' / name)
        images = torch.from_numpy(rgb.transpose(2, 0, 1) / np.float32(255))[None]
        label, background = parse_label(name, 'luad'), background_mask(rgb)
        cams = mean_over_symmetries(lambda x: multi_layer_grad_cam(model, x), images, TRANSFORMS['d4'])
        plain = multi_layer_grad_cam(model, images)
        for layer in LAYERS:
            mask = read_mask(out / f'PM_{layer}' / name)
            np.testing.assert_array_equal(mask, pseudo_mask(cams[layer][0].numpy(), label, background))
            changed += int((mask != pseudo_mask(plain[layer][0].numpy(), label, background)).sum())
    assert changed > 0  # not the masks of the patch alone
    assert json.loads((out / 'generate_pm_args.json').read_text())['args']['tta'] == 'd4'


def test_cam_pictures_use_opencvs_jet_within_3_levels_of_the_formula_it_replaced():
    values = np.linspace(0, 1, 100_001, dtype=np.float32)[None]
    formula = (255 * np.clip(1.5 - np.abs(4 * values[..., None] - np.array([3, 2, 1])), 0, 1)).astype(np.uint8)
    colours = pseudo_masks.jet(values)
    assert colours.shape == formula.shape and colours.dtype == np.uint8
    assert np.abs(colours.astype(int) - formula).max() <= 3
    assert pseudo_masks.jet(np.array([[np.nan]])).tolist() == pseudo_masks.jet(np.array([[0.0]])).tolist()


def test_cli_skips_finished_patches_and_overwrite_recomputes(tiny_setup, tmp_path, capsys):
    root, out = tiny_setup, tmp_path / 'train_PM'
    run(root, out)
    first = mtimes(out)
    metrics = (out / 'pseudo_mask_metrics.json').read_text()
    run(root, out)
    assert mtimes(out) == first  # nothing rewritten
    assert '5 patches already have every mask' in capsys.readouterr().out
    # the scores of a resumed run cover the skipped patches too
    assert json.loads((out / 'pseudo_mask_metrics.json').read_text())['layers'] == json.loads(metrics)['layers']

    missing = sorted((out / 'PM_b5_2').iterdir())[1]
    missing.unlink()  # one layer of one patch missing: that patch is redone, in every layer
    run(root, out)
    again = mtimes(out)
    redone = {p for p in again if again[p] != first.get(p)}
    assert redone == {out / f'PM_{layer}' / missing.name for layer in LAYERS}

    run(root, out, '--overwrite')
    assert all(t != again[p] for p, t in mtimes(out).items())


def test_cli_shards_patches_across_processes(tiny_setup, tmp_path, monkeypatch):
    root, out = tiny_setup, tmp_path / 'train_PM'
    names = sorted(os.listdir(root / 'synth' / 'train'))
    monkeypatch.setattr(pseudo_masks, 'get_world_size', lambda: 2)
    monkeypatch.setattr(pseudo_masks, 'get_rank', lambda: 1)
    monkeypatch.setattr(pseudo_masks, 'is_main_process', lambda: False)
    run(root, out, '--layers', 'bn7')
    assert sorted(os.listdir(out / 'PM_bn7')) == names[1::2]
    assert not (out / 'pseudo_mask_metrics.json').exists()  # only the main process reports


def test_cli_bcss_has_no_background_channel(tmp_path):
    write_dataset(str(tmp_path / 'bcss'), 'bcss', 64, {'train': 2, 'val': 1, 'test': 1}, seed=0)
    # paint a large white area into the patches: luad would call it background, bcss must not
    for path in (tmp_path / 'bcss' / 'train').iterdir():
        rgb = read_rgb(path).copy()
        rgb[:32] = 255
        Image.fromarray(rgb).save(path)
    torch.manual_seed(0)
    save_checkpoint(CAMClassifier(n_class=4, width=0.125).state_dict(), str(tmp_path / 'tiny.pth'))
    args = pseudo_masks.get_args_parser().parse_args(
        ['--weights', str(tmp_path / 'tiny.pth'), '--dataroot', str(tmp_path / 'bcss'), '--dataset', 'bcss',
         '--num_workers', '0', '--device', 'cpu', '--layers', 'bn7'])
    pseudo_masks.main(args)
    for path in (tmp_path / 'bcss' / 'train_PM' / 'PM_bn7').iterdir():
        image = Image.open(path)
        assert image.getpalette()[:15] == DATASETS['bcss'].palette and np.array(image).max() < 4


@pytest.mark.parametrize('flags, message', [
    (['--layers', 'b4_5,conv9'], 'unknown layer conv9'),
    (['--layers', 'bn7,bn7'], 'name each layer once'),
    (['--n_class', '5'], '--n_class 5'),
    (['--batch_size', '0'], '--batch_size 0'),
])
def test_cli_bad_input_is_one_line_and_exit_2(tiny_setup, tmp_path, flags, message, capsys):
    args = pseudo_masks.get_args_parser().parse_args(
        ['--weights', str(tiny_setup / 'tiny.pth'), '--dataroot', str(tiny_setup / 'synth'), '--dataset', 'luad',
         '--out', str(tmp_path / 'out'), *flags])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(pseudo_masks.main, args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1


def test_cli_missing_weights_is_an_input_error(tiny_setup, tmp_path):
    with pytest.raises(InputError, match='checkpoint not found'):
        run(tiny_setup, tmp_path / 'out', '--weights', str(tmp_path / 'nope.pth'))
