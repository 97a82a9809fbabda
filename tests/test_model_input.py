"""What the network is shown at inference: tiles of the size it was trained on (recorded by
3_train_stage2.py, the reference's 224 px otherwise), images smaller than a tile padded to it,
white non-tissue made background by the pseudo-masks' rule (tool/inference/infer.py)."""
import numpy as np
import pytest
import torch

from network.deeplab import DeepLab
from tests.test_infer import random_image, run
from tests.test_stage2 import write_dataset
from tool.core.files import save_png
from tool.data.datasets import BACKGROUND, DATASETS
from tool.data.patches import TissueDataset, read_mask
from tool.inference import infer
from tool.inference.image_source import PixelArray, ReflectPadded, reflect_pad
from tool.method.pseudo_mask import background_mask
from tool.stages import stage2


def save_checkpoint(path, model, **extra):
    torch.save({'state_dict': model.state_dict(), **extra}, path)
    return path


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return DeepLab('resnet18', num_classes=4, width=0.25).eval()


def first_lines(capsys):
    return capsys.readouterr().out.splitlines()


def test_tiles_default_to_the_recorded_patch_size_and_a_different_tile_is_warned_about(model, tmp_path, capsys):
    save_png(random_image(64, 64, seed=0), tmp_path / 'in' / 'a.png')
    ours = save_checkpoint(tmp_path / 'ours.pth', model, input={'patch_size': [64, 64], 'mpp': 1.0})
    bare = tmp_path / 'bare.pth'
    torch.save(model.state_dict(), bare)
    run('--checkpoint', ours, '--input', tmp_path / 'in', '--out', tmp_path / 'o1', '--workers', 0)
    lines = first_lines(capsys)
    assert lines[0] == f'tiles of 64 x 64 px, overlap 9: the patch size the model was trained on (recorded in {ours})'
    run('--checkpoint', bare, '--input', tmp_path / 'in', '--out', tmp_path / 'o2', '--workers', 0)
    assert first_lines(capsys)[0].startswith("tiles of 224 x 224 px, overlap 32: the reference's patch size")
    run('--checkpoint', ours, '--input', tmp_path / 'in', '--out', tmp_path / 'o3', '--workers', 0, '--tile', 128)
    lines = first_lines(capsys)
    assert lines[0].startswith('warning: --tile 128 differs from the 64 px patches the model was trained on')
    assert lines[1] == 'tiles of 128 x 128 px, overlap 18: as --tile asks'


def test_stage2_records_its_training_patch_size_and_resolution(tmp_path):
    write_dataset(str(tmp_path))
    dataset = TissueDataset(str(tmp_path), 'train', 'luad')
    size = read_mask(tmp_path / 'train_gt' / dataset.names[0]).shape
    assert stage2.training_input(dataset, 'luad') == {'patch_size': list(size), 'mpp': 1.0}
    assert stage2.training_input(dataset, 'custom')['mpp'] is None  # the user's to give


def test_an_image_smaller_than_the_tile_is_predicted_padded_to_it_and_cropped(model, tmp_path):
    rgb = random_image(40, 56, seed=3)
    save_png(rgb, tmp_path / 'in' / 'small.png')
    path = save_checkpoint(tmp_path / 'm.pth', model, input={'patch_size': [64, 64], 'mpp': 1.0})
    run('--checkpoint', path, '--input', tmp_path / 'in', '--out', tmp_path / 'out', '--workers', 0,
        '--white_background', 'none')
    predictor = infer.Predictor(model, torch.device('cpu'))
    padded = reflect_pad(rgb, 64, 64)
    assert padded.shape == (64, 64, 3) and np.array_equal(padded[:40, :56], rgb)
    expected = predictor(padded[None]).argmax(1)[0, :40, :56].numpy()
    assert np.array_equal(read_mask(tmp_path / 'out' / 'masks' / 'small.png'), expected)


def test_reflect_padding_of_a_strip_source_equals_padding_the_whole_image():
    rgb = random_image(30, 200, seed=4)
    padded = ReflectPadded(PixelArray(rgb), 64)
    assert (padded.height, padded.width) == (64, 200)
    assert np.array_equal(np.concatenate([padded.read(y, 16) for y in range(0, 64, 16)]), reflect_pad(rgb, 64, 200))
    narrow = ReflectPadded(PixelArray(random_image(300, 20, seed=5)), 64)
    assert narrow.read(100, 64).shape == (64, 64, 3)


def white_scene():
    """Tissue-like colour with a white lumen (30 x 30 px: background) and a white speck (5 x 5 px,
    under the 50 px of the rule: tissue)."""
    rgb = np.clip(random_image(96, 96, seed=6) * 0.6, 0, 180).astype(np.uint8)
    rgb[20:50, 30:60] = 235
    rgb[70:75, 10:15] = 240
    return rgb


def test_white_non_tissue_is_background_exactly_where_the_pseudo_mask_rule_says(model, tmp_path):
    rgb = white_scene()
    white = background_mask(rgb)
    assert white[20:50, 30:60].all() and not white[70:75, 10:15].any()
    plain = infer.Predictor(model, torch.device('cpu'))
    ruled = infer.Predictor(model, torch.device('cpu'), white_background=True)
    logits = ruled(rgb[None])
    assert logits.shape[1] == 5
    labels = logits.argmax(1)[0].numpy()
    assert np.array_equal(labels == BACKGROUND, white)
    assert np.array_equal(labels[~white], plain(rgb[None]).argmax(1)[0].numpy()[~white])
    # blended as probabilities: one-hot background on white, exactly 0 background elsewhere
    probs = logits.softmax(1)[0]
    assert torch.equal(probs[BACKGROUND], torch.from_numpy(white).float())


@pytest.mark.parametrize('dataset, expect_background', [('luad', True), ('custom', True), ('bcss', False)])
def test_the_white_rule_follows_the_datasets_labels(model, tmp_path, dataset, expect_background):
    save_png(white_scene(), tmp_path / 'in' / 'w.png')
    path = save_checkpoint(tmp_path / 'm.pth', model, input={'patch_size': [96, 96], 'mpp': 1.0})
    run('--checkpoint', path, '--input', tmp_path / 'in', '--out', tmp_path / 'out', '--workers', 0,
        '--dataset', dataset)
    labels = read_mask(tmp_path / 'out' / 'masks' / 'w.png')
    assert (labels[20:50, 30:60] == BACKGROUND).all() == expect_background
    assert not (labels == BACKGROUND)[~background_mask(white_scene())].any()
    assert DATASETS[dataset].palette[3 * BACKGROUND:3 * BACKGROUND + 3] == [255, 255, 255]


def settled(*flags, record=None, needs_mpp=True):
    args = infer.get_args_parser().parse_args(['--checkpoint', 'c.pth', '--input', 'x', '--out', 'o', *map(str, flags)])
    infer.choose_model_input(args, record or {}, needs_mpp)
    return args


def test_slides_are_segmented_at_the_recorded_resolution_and_a_custom_one_must_be_given(capsys):
    assert settled(record={'patch_size': [96, 96], 'mpp': 0.5}).model_mpp == 0.5  # the checkpoint's
    assert settled('--dataset', 'bcss').model_mpp == 0.25  # the dataset's, for a bare checkpoint
    assert settled('--mpp', 2.0, record={'mpp': 0.5}).model_mpp == 2.0
    assert 'warning: --mpp 2 differs from the 0.5 um per pixel' in capsys.readouterr().out
    with pytest.raises(infer.InputError, match='the resolution the model was trained at is unknown'):
        settled('--dataset', 'custom')
    assert settled('--dataset', 'custom', needs_mpp=False).model_mpp is None  # --level, or no slides
