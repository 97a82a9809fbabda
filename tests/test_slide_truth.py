"""A model trained at one patch size scores on a slide of its own data what it scores on its
patches: a DeepLab trained (fully supervised, to isolate inference) on 64-px patches of the
synthetic generator, then synthetic slides of the same generator (tool/data/synth_slide.py:
patches on glass, a pyramidal TIFF at 0.5 um per pixel, the truth at the patches' 1 um) segmented
by 4_infer.py and scored like their patches (bench/bench_slide_truth.py's scoring).

Where a tile straddles two unrelated patches of a synthetic mosaic, the model sees a seam that
tissue does not have, so the slides are built two ways that leave seams out of the comparison:
cells six tiles across (a seventh of the tiles touch a seam), segmented with the defaults; and a
mosaic of patches of the model's own size with the tiles on the patches (overlap 0, the grid from
the slide's corner). Measured on this machine with two models (test MIoU 0.68 and 0.88): 0.2 and
0.1 points between the slide and its cells, 0.3 and 0.2 between the mosaic and its patches; the
same cells shown whole (tiles of 384 px) 0.09 and 0.15."""
import pytest

from bench.bench_slide_truth import patch_scores, slide_scores
from tool.data import synth, synth_slide
from tool.stages import stage2

PATCH = 64  # the size the model learns on
CELL = 6 * PATCH


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """(checkpoint, its test MIoU on 64-px patches, the root of its slides)."""
    root = tmp_path_factory.mktemp('slide_truth')
    synth.write_dataset(str(root / 'data'), 'luad', PATCH, {'train': 240, 'val': 16, 'test': 32}, seed=0)
    scores = stage2.main(stage2.get_args_parser().parse_args([str(a) for a in (
        '--dataset', 'luad', '--dataroot', root / 'data', '--savepath', root / 'model', '--supervision', 'gt',
        '--backbone', 'resnet18', '--width', 0.25, '--resume', 'none', '--epochs', 6, '--batch-size', 8,
        '--lr', 0.03, '--workers', 0, '--device', 'cpu', '--Is_GM', 'False')]))
    return root / 'model' / 'stage2_checkpoint_trained_on_luad.pth', scores['no_gate']['miou'], root


def test_a_slide_with_the_defaults_scores_what_its_patches_score(trained, tmp_path):
    checkpoint, test_miou, root = trained
    assert test_miou > 0.55, test_miou  # it learnt
    synth_slide.build_slide(str(root / 'cells'), 'own', 'luad', patch_size=CELL, cells=5, seed=0)
    stem = root / 'cells' / 'own'
    cells = patch_scores(stem, checkpoint, tmp_path / 'cells')  # 384-px cells one by one, 64-px tiles
    slide = slide_scores(stem, checkpoint, tmp_path / 'slide', [])  # defaults: 64-px tiles from the checkpoint
    whole = slide_scores(stem, checkpoint, tmp_path / 'whole', ['--tile', CELL, '--overlap', 0])
    assert abs(slide['miou'] - cells['miou']) <= 0.04, (slide, cells)
    assert slide['lost'] <= 0.05, slide  # tissue detection keeps the tissue
    assert whole['miou'] < slide['miou'] - 0.3, (whole, slide)  # the control: another extent, another model


def test_a_mosaic_of_its_own_patches_scores_as_the_patches_and_air_is_background(trained, tmp_path):
    checkpoint, _, root = trained
    synth_slide.build_slide(str(root / 'mosaic'), 'own', 'luad', patch_size=PATCH, cells=10, seed=0)
    stem = root / 'mosaic' / 'own'
    patches = patch_scores(stem, checkpoint, tmp_path / 'patches')
    aligned = slide_scores(stem, checkpoint, tmp_path / 'aligned', ['--no_tissue_detection', '--overlap', 0])
    default = slide_scores(stem, checkpoint, tmp_path / 'default', [])
    assert abs(aligned['miou'] - patches['miou']) <= 0.02, (aligned, patches)
    assert default['white'] >= 0.9 and default['lost'] <= 0.05, default  # the white rule; tissue detection
