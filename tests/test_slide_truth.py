"""A model trained at one patch size scores on a slide of its own data what it scores on its
patches: a DeepLab trained (fully supervised, to isolate inference) on 64-px patches of the
synthetic generator, then a synthetic slide of the same generator (tool/synth_slide.py: patches
on glass, a pyramidal TIFF at 0.5 um per pixel, its truth at the patches' 1 um) segmented by
4_infer.py with its defaults, scored like the patches (bench/bench_slide_truth.py's scoring).

Shown the slide in tiles of another size (here the slide's 192-px cells), DeepLab's image-level
pooling sees another extent and the score falls: the control that the defaults matter."""
import pytest

from bench.bench_slide_truth import patch_scores, slide_scores
from tool import stage2, synth, synth_slide

PATCH = 64  # the size the model learns on
CELL = 3 * PATCH  # the slide's cells: a mosaic of patch-sized cells would measure its seams


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """(checkpoint, its test MIoU on 64-px patches, slide stem)."""
    root = tmp_path_factory.mktemp('slide_truth')
    synth.write_dataset(str(root / 'data'), 'luad', PATCH, {'train': 240, 'val': 16, 'test': 32}, seed=0)
    scores = stage2.main(stage2.get_args_parser().parse_args([str(a) for a in (
        '--dataset', 'luad', '--dataroot', root / 'data', '--savepath', root / 'model', '--supervision', 'gt',
        '--backbone', 'resnet18', '--width', 0.25, '--resume', 'none', '--epochs', 6, '--batch-size', 8,
        '--lr', 0.03, '--workers', 0, '--device', 'cpu', '--Is_GM', 'False')]))
    synth_slide.build_slide(str(root / 'slides'), 'own', 'luad', patch_size=CELL, cells=5, seed=0)
    return root / 'model' / 'stage2_checkpoint_trained_on_luad.pth', scores, root / 'slides' / 'own'


def test_the_slide_scores_what_its_patches_score_and_air_is_background(trained, tmp_path):
    checkpoint, test_scores, stem = trained
    test_miou = test_scores['no_gate']['miou']
    patches = patch_scores(stem, checkpoint, tmp_path / 'patches')  # the slide's cells one by one
    slide = slide_scores(stem, checkpoint, tmp_path / 'slide', [])  # defaults: 64-px tiles from the checkpoint
    assert test_miou > 0.6, test_miou  # it learnt
    assert abs(slide['miou'] - patches['miou']) <= 0.04, (slide, patches)
    assert abs(slide['miou'] - test_miou) <= 0.06, (slide, test_miou)
    assert slide['white'] >= 0.9 and slide['lost'] <= 0.05, slide  # the white rule; tissue detection


def test_tiles_of_another_size_than_the_models_score_lower(trained, tmp_path):
    checkpoint, _, stem = trained
    default = slide_scores(stem, checkpoint, tmp_path / 'default', [])
    other = slide_scores(stem, checkpoint, tmp_path / 'other', ['--tile', CELL, '--overlap', 0])
    assert other['miou'] < default['miou'] - 0.05, (default, other)
