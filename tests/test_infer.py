"""Inference (4_infer.py, tool/inference/infer.py, tool/inference/sliding_window.py, tool/inference/image_source.py) with a tiny
DeepLab (MobileNetV2 backbone, random weights) on small images: outputs, metrics, tiled blending
against the whole-image computation, a pyramid level through OpenSlide, memory bound, errors.
Whole slides at a resolution, tissue detection and the slide outputs: tests/test_wsi.py."""
import csv
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from network.deeplab import DeepLab
from network.resnet38_cls import CAMClassifier
from tool.core.checkpoint import read_state_dict
from tool.core.errors import run_cli
from tool.core.files import save_palette_png, save_png
from tool.data.datasets import DATASETS
from tool.data.patches import read_mask, read_rgb
from tool.inference import infer
from tool.inference.image_source import PixelArray, image_height_width, open_image, reflect_pad
from tool.inference.overlay import overlay
from tool.inference.sliding_window import blend_window, blended_rows, tile_starts
from tool.method.gate import gate_classes, gated_prediction
from tool.method.metrics import ConfusionMatrix, scores_to_json
from tool.wsi.slide_reader import over_white

ROOT = Path(__file__).resolve().parents[1]
TILE, OVERLAP = 64, 16


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A stage-2 checkpoint in the reference's format, {'state_dict': ...}, whose four classes all
    occur: random weights give each class its own offset, so the classifier bias is set to cancel
    the mean logits (otherwise one class wins almost everywhere and comparisons say little)."""
    torch.manual_seed(0)
    model = DeepLab('mobilenet', num_classes=4).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():
        mean_logits = model(torch.rand(2, 3, TILE, TILE)).mean((0, 2, 3))
        model.decoder.last_conv[8].bias -= mean_logits
    path = tmp_path_factory.mktemp('weights') / 'stage2.pth'
    torch.save({'state_dict': model.state_dict()}, path)
    return path


@pytest.fixture(scope='module')
def predictor(checkpoint):
    model = DeepLab('mobilenet', num_classes=4)
    model.load_state_dict(read_state_dict(checkpoint))
    return infer.Predictor(model, torch.device('cpu'))


def random_image(height, width, seed):
    """Smooth colour fields plus noise: structure at several scales, like tissue, unlike pure noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.float32)
    return np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)


def run(*argv):
    return run_cli(infer.main, infer.get_args_parser().parse_args([str(a) for a in argv]))


def cli(checkpoint, input_path, out, *extra):
    return run('--checkpoint', checkpoint, '--input', input_path, '--out', out, '--device', 'cpu',
               '--workers', 0, '--tile', TILE, '--overlap', OVERLAP, *extra)


def expect_exit_2(capsys, *argv):
    with pytest.raises(SystemExit) as stop:
        run(*argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and '\n' not in err, err
    return err


def blend_in_memory(rgb, predictor, tile, overlap):
    """The obviously correct slow path: full-image accumulators, one tile at a time."""
    height, width = rgb.shape[:2]
    tile_h, tile_w = min(tile, height), min(tile, width)
    window = blend_window(tile_h, tile_w, overlap)
    summed, weights = torch.zeros(4, height, width), torch.zeros(height, width)
    for y in tile_starts(height, tile_h, overlap):
        for x in tile_starts(width, tile_w, overlap):
            probs = predictor(rgb[None, y:y + tile_h, x:x + tile_w]).softmax(1)[0]
            summed[:, y:y + tile_h, x:x + tile_w] += probs * window
            weights[y:y + tile_h, x:x + tile_w] += window
    return summed / weights


def assert_argmax(labels, scores, margin=1e-3):
    """labels == scores.argmax(0) wherever the best two classes differ by more than `margin`:
    another batch composition changes logits in the last bits (oneDNN picks kernels by batch)."""
    top2 = scores.topk(2, dim=0).values
    clear = (top2[0] - top2[1] > margin).numpy()
    assert clear.mean() > 0.99
    assert np.array_equal(np.asarray(labels)[clear], scores.argmax(0).numpy()[clear])


def tiled_labels(rgb, predictor, tile=TILE, overlap=OVERLAP):
    rows = list(blended_rows(PixelArray(rgb), predictor, tile, overlap))
    return torch.cat([probs for _, probs in rows], 1).argmax(0).numpy()


def write_pyramid(path, rgb):
    """A tiled pyramidal TIFF as scanners write them: full resolution, then a 2x reduced level."""
    with tifffile.TiffWriter(path) as tiff:
        tiff.write(rgb, tile=(64, 64), photometric='rgb', metadata=None)
        tiff.write(rgb[::2, ::2], tile=(64, 64), photometric='rgb', subfiletype=1, metadata=None)


# ---- tiling ------------------------------------------------------------------------------------

@pytest.mark.parametrize('size, tile, overlap', [(64, 64, 16), (65, 64, 16), (200, 64, 16), (1000, 224, 32),
                                                 (300, 100, 0), (50, 64, 16)])
def test_tile_starts_cover_the_image_with_at_least_the_overlap(size, tile, overlap):
    tile = min(tile, size)
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] == size - tile
    steps = np.diff(starts)
    assert (steps > 0).all() and (steps <= tile - overlap).all()
    if len(starts) > 2:  # the fewest tiles: one less, spread evenly, would overlap too little
        assert (size - tile) / (len(starts) - 2) > tile - overlap


def test_blend_window_ramps_linearly_at_the_edges():
    window = blend_window(8, 6, 2)
    assert torch.allclose(window[:, 2], torch.tensor([1 / 3, 2 / 3, 1, 1, 1, 1, 2 / 3, 1 / 3]))
    assert torch.allclose(window[2], torch.tensor([1 / 3, 2 / 3, 1, 1, 2 / 3, 1 / 3])) and window.min() > 0
    assert torch.equal(blend_window(5, 5, 0), torch.ones(5, 5))


def test_strips_equal_blending_the_whole_image_in_memory(predictor):
    rgb = random_image(192, 256, seed=1)  # 4 x 5 tiles of 64 px
    rows = list(blended_rows(PixelArray(rgb), predictor, TILE, OVERLAP, batch_size=3))
    starts = [y for y, _ in rows]
    heights = [probs.shape[1] for _, probs in rows]
    assert starts == [0, *np.cumsum(heights)[:-1]] and sum(heights) == 192  # every row once, in order
    assert max(heights) <= TILE  # never more than a tile of rows is held
    strips = torch.cat([probs for _, probs in rows], 1)
    whole = blend_in_memory(rgb, predictor, TILE, OVERLAP)  # tiles one at a time: logits differ in the last bits
    assert torch.allclose(strips, whole, atol=1e-4)  # a row off would differ by ~1e-2
    assert_argmax(strips.argmax(0), whole)
    assert len(torch.unique(strips.argmax(0))) == 4



class ContextLogits:
    """A deterministic stand-in for a network whose output at a pixel depends on the tile around it
    (its mean colour) and on the rest of its batch (the batch's mean), as a network's does in the
    last bits (oneDNN picks kernels by batch): a resumed run that batched tiles differently, or
    blended another tile's values, would not match to the bit. It records the tiles' rows."""

    def __init__(self):
        self.calls = []

    def __call__(self, rgb):
        self.calls.append(len(rgb))
        x = torch.as_tensor(rgb).permute(0, 3, 1, 2).float() / 255
        tile_mean = x.mean((2, 3), keepdim=True)
        x = torch.cat((x, x.mean(1, keepdim=True)), 1) * 3 + tile_mean.sum(1, keepdim=True) * x.mean(1, keepdim=True)
        return x + 0.37 * x.mean(0, keepdim=True)


@pytest.mark.parametrize('height, width, tile, overlap', [(173, 90, 32, 8), (150, 70, 32, 20), (121, 50, 24, 21),
                                                         (100, 40, 64, 16), (30, 40, 64, 16), (200, 33, 17, 0)])
def test_a_run_started_at_any_row_yields_the_same_floats_as_a_run_from_the_top(height, width, tile, overlap):
    """start_row (a slide resumed after a kill): the rows from there on are those of the run from
    row 0, bit for bit, with and without skipped tiles (rows of tiles without any, too), for
    overlaps under and over half a tile; only the rows of tiles that reach below start_row run again."""
    from tool.inference.sliding_window import resumed_tiles, tile_grid
    rgb = random_image(height, width, seed=height + tile)
    tile_h, tile_w, ys, xs = tile_grid(height, width, tile, overlap)
    rng = np.random.default_rng(tile * overlap)
    drop = {(y, x) for y in ys for x in xs if rng.random() < 0.4} - {(0, xs[0])}
    drop |= {(y, x) for y in ys[1:len(ys) // 2 + 1] for x in xs}  # whole rows of tiles skipped
    for skip in (None, lambda y, x: (y, x) in drop):
        whole = ContextLogits()
        rows = list(blended_rows(PixelArray(rgb), whole, tile, overlap, batch_size=2, skip=skip))
        full = torch.cat([probs for _, probs in rows], 1)
        assert full.shape[1] == height
        every_tile = {(y, x) for y in ys for x in xs if not (skip and skip(y, x))}
        for start in sorted({*[y for y, _ in rows], 1, height // 3, height - 1, height, height + 5}):
            resumed = ContextLogits()
            part = list(blended_rows(PixelArray(rgb), resumed, tile, overlap, batch_size=2, skip=skip, start_row=start))
            if start >= height:
                assert part == [] and resumed.calls == []
                continue
            assert part[0][0] == start and all(y == start + sum(p.shape[1] for _, p in part[:i])
                                               for i, (y, _) in enumerate(part))
            assert torch.equal(torch.cat([probs for _, probs in part], 1), full[:, start:]), start
            # run again: the rows of tiles reaching below start (with an overlap over half a tile,
            # several), from the nearest above that predicts a tile if the first of them predicts none
            reaching = min(y for y in ys if y + tile_h > start)
            first = max(y for y in ys if y <= reaching and (y == 0 or any(t[0] == y for t in every_tile)))
            assert first <= start and sum(resumed.calls) == sum(y >= first for y, _ in every_tile)
            kept = resumed_tiles(height, width, tile, overlap, start, every_tile)
            assert sum(resumed.calls) == len(every_tile) - kept


MEMORY_PROBE = '''
import json, resource, sys
import numpy as np, torch
from tool.inference.image_source import PixelArray
from tool.inference.sliding_window import blended_rows

def logits(rgb):  # four "classes" from the pixels: cheap, the probe measures memory, not a network
    x = torch.as_tensor(rgb).permute(0, 3, 1, 2).float() / 255
    return torch.cat((x, x.mean(1, keepdim=True)), 1)

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == 'darwin' else 2 ** 10)

size, tile = 4096, 256
image = PixelArray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
for _ in blended_rows(PixelArray(image.pixels[:600, :600]), logits, tile, 32, 4):  # warm up the allocator
    pass
before = peak_mb()
labels = np.empty((size, size), np.uint8)
heights = []
for y, probs in blended_rows(image, logits, tile, 32, 4):
    labels[y:y + probs.shape[1]] = probs.max(0).indices.numpy()
    heights.append(probs.shape[1])
print(json.dumps({'grown_mb': peak_mb() - before, 'heights': heights, 'classes': np.bincount(labels.ravel()).tolist()}))
'''


def test_a_4096_image_is_blended_in_memory_bounded_by_width_times_tile():
    """Full-image accumulators would take 4 x 4096 x 4096 x 4 B = 256 MB for the probabilities and
    64 MB for the weights; strips of 256 rows take 16 + 4 MB. The peak resident memory of a fresh
    process may grow by at most half the full-image size: the 16 MB label array, the strip
    accumulators, one finished strip and a batch of tiles (about 90 MB measured)."""
    result = subprocess.run([sys.executable, '-c', MEMORY_PROBE], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout)
    assert sum(probe['heights']) == 4096 and max(probe['heights']) <= 256
    assert sum(probe['classes']) == 4096 * 4096
    assert probe['grown_mb'] < 160, probe['grown_mb']


# ---- command line: patches, outputs, metrics ---------------------------------------------------

def test_folder_of_patches_writes_masks_overlays_areas_and_metrics(checkpoint, predictor, tmp_path, capsys):
    images, truth = tmp_path / 'img', tmp_path / 'truth'
    rng = np.random.default_rng(0)
    patches = {f'patch{i}': random_image(TILE, TILE, seed=10 + i) for i in range(3)}
    patches['small'] = random_image(40, 48, seed=20)  # smaller than the tile: padded to it, cropped back
    for name, rgb in patches.items():
        save_png(rgb, images / f'{name}.png')
        save_palette_png(rng.integers(0, 5, rgb.shape[:2]), DATASETS['bcss'].palette, truth / f'{name}.png')
    (images / 'notes.txt').write_text('not an image')

    cli(checkpoint, images, tmp_path / 'out', '--dataset', 'bcss', '--masks', truth, '--batch_size', 2)

    out = tmp_path / 'out'
    assert sorted(os.listdir(out / 'masks')) == sorted(f'{n}.png' for n in patches)
    assert sorted(os.listdir(out / 'overlays')) == sorted(f'{n}.png' for n in patches)
    confusion = ConfusionMatrix(4)
    with open(out / 'areas.csv') as f:
        areas = {row['name']: row for row in csv.DictReader(f)}
    assert list(areas) == sorted(patches)
    for name, rgb in patches.items():
        mask_image = Image.open(out / 'masks' / f'{name}.png')
        assert mask_image.mode == 'P' and mask_image.getpalette()[:15] == DATASETS['bcss'].palette
        mask = np.asarray(mask_image)
        # whole patches: the argmax of the model's logits, as the reference's test phase
        height, width = rgb.shape[:2]
        assert_argmax(mask, predictor(reflect_pad(rgb, TILE, TILE)[None])[0, :, :height, :width])
        assert np.array_equal(read_rgb(out / 'overlays' / f'{name}.png'),
                              overlay(PixelArray(rgb), mask, DATASETS['bcss'].palette))
        row = areas[name]
        counts = np.bincount(mask.ravel(), minlength=4)
        assert int(row['pixels']) == mask.size
        assert [int(row[f'{c}_pixels']) for c in DATASETS['bcss'].class_names] == counts.tolist()
        fractions = [float(row[c]) for c in DATASETS['bcss'].class_names]
        assert np.allclose(fractions, counts / mask.size, atol=1e-6) and abs(sum(fractions) - 1) < 1e-5
        confusion.update(read_mask(truth / f'{name}.png'), mask)
    assert json.loads((out / 'metrics.json').read_text()) == {
        'prediction': 'stage 2', 'images': 4, **json.loads(json.dumps(scores_to_json(confusion.scores(), DATASETS['bcss'].class_names)))}
    printed = capsys.readouterr().out
    assert '4 image(s) segmented' in printed and 'TUM' in printed and 'MIoU' in printed


def test_overlay_is_the_references_fuse_of_mask_and_image():
    cv2 = pytest.importorskip('cv2')
    rgb = random_image(50, 70, seed=3)
    labels = np.random.default_rng(0).integers(0, 5, (50, 70)).astype(np.uint8)
    colours = np.asarray(DATASETS['luad'].palette, np.uint8).reshape(-1, 3)[labels]
    expected = cv2.addWeighted(colours, 0.3, rgb, 0.7, 0)
    assert np.abs(overlay(PixelArray(rgb), labels, DATASETS['luad'].palette, rows=16).astype(int) - expected).max() <= 1


@pytest.mark.parametrize('mode', ['multiply', 'mask'])
def test_gate_equals_gated_prediction_of_the_stage1_classifier(checkpoint, predictor, tmp_path, mode):
    torch.manual_seed(0)
    stage1 = CAMClassifier(n_class=4, width=1 / 16).eval()
    with torch.no_grad():  # features are >= 0 (and small at random init): a large negative row makes a class absent
        stage1.fc8.weight.copy_(torch.tensor([1e3, -1e3, 1e3, 1e3])[:, None, None, None].expand_as(stage1.fc8.weight))
    torch.save(stage1.state_dict(), tmp_path / 'stage1.pth')
    rgb = random_image(TILE, TILE, seed=5)
    save_png(rgb, tmp_path / 'img' / 'p.png')

    cli(checkpoint, tmp_path / 'img', tmp_path / 'out', '--stage1', tmp_path / 'stage1.pth', '--gate', mode,
        '--white_background', 'none')  # the gate alone

    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        present = gate_classes(stage1(x))
        expected = gated_prediction(predictor(rgb[None]), present, mode)[0].numpy()
    assert present.tolist() == [[True, False, True, True]]
    mask = read_mask(tmp_path / 'out' / 'masks' / 'p.png')
    assert np.array_equal(mask, expected)
    if mode == 'mask':
        assert 1 not in mask


# ---- large images and whole slides ---------------------------------------------------------------

def test_large_png_and_flat_tiff_are_tiled_like_the_library_computes(checkpoint, predictor, tmp_path):
    rgb = random_image(150, 200, seed=7)
    save_png(rgb, tmp_path / 'img' / 'big.png')
    tifffile.imwrite(tmp_path / 'img' / 'flat.tif', rgb, photometric='rgb')
    cli(checkpoint, tmp_path / 'img', tmp_path / 'out')
    expected = tiled_labels(rgb, predictor)
    for name in ('big', 'flat'):
        assert np.array_equal(read_mask(tmp_path / 'out' / 'masks' / f'{name}.png'), expected), name
    assert np.array_equal(read_rgb(tmp_path / 'out' / 'overlays' / 'big.png'),
                          overlay(PixelArray(rgb), expected, DATASETS['luad'].palette))


def slide_outputs(out, name='slide'):
    """The class indices of a slide's mask TIFF (its full-resolution page) and its overlay."""
    folder = out / 'slides' / name
    return tifffile.imread(folder / f'{name}-mask.tiff'), read_rgb(folder / f'{name}-overlay.png')


@pytest.mark.parametrize('level', [0, 1])
def test_a_pyramid_level_through_openslide_equals_tiling_the_same_pixels(checkpoint, predictor, tmp_path, level):
    pytest.importorskip('openslide', reason='OpenSlide is optional: pip install -r requirements-wsi.txt')
    rgb = random_image(192, 256, seed=8)
    write_pyramid(tmp_path / 'slide.tif', rgb)
    cli(checkpoint, tmp_path / 'slide.tif', tmp_path / 'out', '--level', level, '--no_tissue_detection',
        '--white_background', 'none')  # the network's tiles alone
    mask, overlaid = slide_outputs(tmp_path / 'out')
    pixels = tifffile.TiffFile(tmp_path / 'slide.tif').series[0].levels[level].asarray()
    assert mask.shape == (192 >> level, 256 >> level) == pixels.shape[:2]
    assert np.array_equal(mask, tiled_labels(pixels, predictor))
    assert np.array_equal(overlaid, overlay(PixelArray(pixels), mask, DATASETS['luad'].palette))


def test_a_slide_level_that_fits_in_one_tile_is_predicted_whole(checkpoint, predictor, tmp_path):
    pytest.importorskip('openslide', reason='OpenSlide is optional: pip install -r requirements-wsi.txt')
    rgb = random_image(192, 256, seed=8)
    write_pyramid(tmp_path / 'slide.tif', rgb)
    run('--checkpoint', checkpoint, '--input', tmp_path / 'slide.tif', '--out', tmp_path / 'out', '--device', 'cpu',
        '--workers', 0, '--level', 1, '--tile', 128, '--no_tissue_detection')
    logits = predictor(rgb[None, ::2, ::2])[0]
    assert_argmax(slide_outputs(tmp_path / 'out')[0], logits)


def test_large_images_lift_pils_decompression_bomb_limit_only_while_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)  # stands in for PIL's 89 M: 64 x 64 is a "bomb" now
    save_png(random_image(64, 64, seed=0), tmp_path / 'a.png')
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / 'a.png')
    assert image_height_width(str(tmp_path / 'a.png')) == (64, 64)
    with open_image(str(tmp_path / 'a.png')) as image:
        assert image.read(60, 10).shape == (4, 64, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_transparent_slide_areas_read_as_white():
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 0], [100, 0, 200, 128]]], np.uint8)
    assert over_white(rgba).tolist() == [[[10, 20, 30], [255, 255, 255], [255, 255, 255], [177, 127, 227]]]


def test_a_slide_without_openslide_installed_is_one_line_exit_2(checkpoint, tmp_path, monkeypatch, capsys):
    write_pyramid(tmp_path / 'slide.tif', random_image(128, 128, seed=9))
    monkeypatch.setitem(sys.modules, 'openslide', None)  # `import openslide` now raises ImportError
    err = expect_exit_2(capsys, '--checkpoint', checkpoint, '--input', tmp_path / 'slide.tif',
                        '--out', tmp_path / 'out', '--device', 'cpu')
    assert 'slide.tif' in err and 'pip install -r requirements-wsi.txt' in err


# ---- resuming and errors -----------------------------------------------------------------------

def test_finished_images_are_skipped_unless_overwrite_and_areas_cover_every_mask(checkpoint, tmp_path, capsys):
    for i in range(2):
        save_png(random_image(TILE, TILE, seed=30 + i), tmp_path / 'img' / f'p{i}.png')
    save_png(random_image(TILE, TILE, seed=32), tmp_path / 'other' / 'q.png')
    out = tmp_path / 'out'
    cli(checkpoint, tmp_path / 'img', out)
    original = read_mask(out / 'masks' / 'p0.png')
    save_palette_png(np.full_like(original, 3), DATASETS['luad'].palette, out / 'masks' / 'p0.png')  # "finished" earlier
    capsys.readouterr()

    cli(checkpoint, tmp_path / 'img', out)
    assert (read_mask(out / 'masks' / 'p0.png') == 3).all()
    assert '0 image(s) segmented, 2 already finished' in capsys.readouterr().out

    os.remove(out / 'overlays' / 'p1.png')  # a run killed between mask and overlay: not finished
    cli(checkpoint, tmp_path / 'other', out)
    cli(checkpoint, tmp_path / 'img', out)
    assert '1 image(s) segmented, 1 already finished' in capsys.readouterr().out.splitlines()[-1]
    with open(out / 'areas.csv') as f:
        areas = {row['name']: row for row in csv.DictReader(f)}
    assert sorted(areas) == ['p0', 'p1', 'q'] and areas['p0']['TAS'] == '1.000000'

    cli(checkpoint, tmp_path / 'img', out, '--overwrite')
    assert np.array_equal(read_mask(out / 'masks' / 'p0.png'), original)
    with open(out / 'areas.csv') as f:
        assert float(next(r for r in csv.DictReader(f) if r['name'] == 'p0')['TAS']) < 1


def test_bad_checkpoint_exits_2_with_one_line(checkpoint, tmp_path, monkeypatch, capsys):
    save_png(random_image(TILE, TILE, seed=0), tmp_path / 'img' / 'p.png')
    data = checkpoint.read_bytes()
    (tmp_path / 'broken.pth').write_bytes(data[:len(data) // 2])  # an interrupted download
    monkeypatch.setattr(sys, 'argv', ['4_infer.py', '--checkpoint', str(tmp_path / 'broken.pth'),
                                      '--input', str(tmp_path / 'img'), '--out', str(tmp_path / 'out')])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / '4_infer.py'), run_name='__main__')  # the script itself, as users run it
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith(f'error: {tmp_path / "broken.pth"}: corrupt')


def test_input_errors_exit_2_with_one_line(checkpoint, tmp_path, capsys):
    save_png(random_image(TILE, TILE, seed=0), tmp_path / 'img' / 'p.png')
    torch.save(CAMClassifier(n_class=4, width=1 / 16).state_dict(), tmp_path / 'stage1.pth')
    base = ['--checkpoint', checkpoint, '--input', tmp_path / 'img', '--out', tmp_path / 'out', '--device', 'cpu']
    cases = [
        (['--checkpoint', tmp_path / 'stage1.pth'], 'not a DeepLab state_dict'),
        (['--masks', tmp_path / 'img' / 'missing'], 'ground-truth mask folder not found'),
        (['--masks', tmp_path], 'ground-truth mask missing'),
        (['--level', 1], 'a plain image has only level 0'),
        (['--gate', 'mask'], 'needs the stage-1 classifier'),
        (['--overlap', 64, '--tile', 64], '--overlap 64'),
        (['--input', tmp_path / 'nothing'], 'not found'),
    ]
    for extra, message in cases:
        assert message in expect_exit_2(capsys, *base, *extra), extra
