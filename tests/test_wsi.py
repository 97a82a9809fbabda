"""Whole slides (tool/wsi/slide_reader.py, tissue.py, label_raster.py, mask_tiff.py,
slide_outputs.py, slide_inference.py, cohort.py) on pyramidal TIFFs the tests write with tifffile:
tiled, several levels, a resolution, white glass around tissue.

Most checks run the real pipeline with a stand-in for the network, ColourClasses, which gives each
pixel the class of the nearest of four paint colours. That rule is pixel-wise, so blending cannot
change it and every output is known exactly: the mask, the tiles that must be run, the polygons
in level-0 pixels. The tiny random DeepLab of tests/test_infer.py runs the command line itself:
resampled reading, resume after SIGKILL, two processes under torchrun, bfloat16 on the CPU."""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
import torch
from PIL import Image

from tests.test_infer import (OVERLAP, TILE, assert_argmax,  # noqa: F401 (fixtures: a tiny stage-2 DeepLab)
                              checkpoint, cli, predictor, random_image, run)
from tool.core.errors import InputError
from tool.data.datasets import BACKGROUND, DATASETS
from tool.inference import infer
from tool.inference.image_source import PixelArray
from tool.inference.overlay import overlay
from tool.inference.sliding_window import blended_rows
from tool.wsi.cohort import run_cohort
from tool.wsi.mask_tiff import pyramid_sizes
from tool.wsi.slide_inference import find_tissue
from tool.wsi.slide_outputs import areas
from tool.wsi.slide_reader import SlideView, WholeSlide, segmentation_grid
from tool.wsi.tissue import TissueMap, detect_tissue, saturation

openslide = pytest.importorskip('openslide', reason='OpenSlide is optional: pip install -r requirements-wsi.txt')

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
PAINT = np.array([[200, 40, 40], [40, 160, 40], [60, 80, 220], [230, 150, 30]], np.uint8)  # classes 0..3
GLASS = 240
LEVEL0_MPP = 0.5  # the test slides' level 0; the LUAD models segment at 1 um: level 1, read as it is


def write_slide(path, level0, mpp=LEVEL0_MPP, downsamples=(1, 2, 4)):
    """A tiled pyramidal TIFF as scanners write them, each level the level-0 pixels subsampled."""
    resolution = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit='CENTIMETER') if mpp else {}
    with tifffile.TiffWriter(path) as tiff:
        for i, d in enumerate(downsamples):
            tiff.write(level0[::d, ::d], tile=(64, 64), photometric='rgb', subfiletype=1 if i else 0,
                       metadata=None, compression='zlib', **(resolution if i == 0 else {}))


def painted_slide(seed=0):
    """Level 0 (768 x 1024, 0.5 um) and its classes on the 1-um grid (384 x 512, 4 = glass): a
    tissue rectangle of class 2 holding a square of class 0 with a square hole of class 1 and a
    small glass hole, a disc of class 3, a speck of tissue smaller than the smallest kept."""
    classes = np.full((384, 512), BACKGROUND, np.uint8)
    classes[32:288, 32:288] = 2  # rows, columns
    classes[96:224, 96:224] = 0
    classes[144:176, 144:176] = 1
    classes[240:264, 160:184] = BACKGROUND  # 24 x 24 um: a hole of glass that tissue detection fills
    rows, columns = np.mgrid[:384, :512]
    classes[(rows - 160) ** 2 + (columns - 420) ** 2 < 70 ** 2] = 3  # 15400 um2
    classes[330:370, 60:100] = 0  # 40 x 40 um = 1600 um2: a speck
    rgb = np.where(classes[..., None] < BACKGROUND, PAINT[np.minimum(classes, 3)], np.uint8(GLASS))
    level0 = np.repeat(np.repeat(rgb, 2, 0), 2, 1).astype(np.int16)
    level0 += np.random.default_rng(seed).integers(-3, 4, level0.shape, dtype=np.int16)
    return level0.astype(np.uint8), classes


def nearest_paint(rgb):
    """The stand-in network's classes: the nearest paint colour of each pixel."""
    distance = ((rgb[..., None, :].astype(np.int32) - PAINT.astype(np.int32)) ** 2).sum(-1)
    return distance.argmin(-1)


class ColourClasses:
    """A stand-in for the network: logits = minus the squared distance to each paint colour; it
    records every tile it is given."""

    def __init__(self):
        self.tiles = []

    def __call__(self, rgb):
        self.tiles.extend(np.array(rgb))
        distance = ((torch.as_tensor(rgb)[..., None, :].float() - torch.as_tensor(PAINT).float()) ** 2).sum(-1)
        return -distance.permute(0, 3, 1, 2)


def settings(out, *extra):
    args = infer.get_args_parser().parse_args(
        ['--checkpoint', 'unused', '--input', 'unused', '--out', str(out), '--tile', str(TILE),
         '--overlap', str(OVERLAP), *map(str, extra)])
    infer.choose_model_input(args, {}, needs_mpp=False)  # as 4_infer.py does with a bare checkpoint
    return args


def expect_exit_2(capsys, *argv):
    """The one error line of a run that must stop with status 2 (a slide's progress bar, cleared
    with carriage returns, may share stderr with it, as on a terminal)."""
    with pytest.raises(SystemExit) as stop:
        run(*argv)
    assert stop.value.code == 2
    lines = [part.strip() for part in re.split(r'[\r\n]', capsys.readouterr().err) if part.strip()]
    messages = [line for line in lines if 'tile/s]' not in line]
    assert len(messages) == 1 and messages[0].startswith('error: '), lines
    return messages[0]


def slide_files(out, name):
    folder = out / 'slides' / name
    return folder / f'{name}-mask.tiff', folder / f'{name}.geojson', folder / f'{name}-overlay.png'


def table(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def rings_of(features, name):
    return [f['geometry']['coordinates'] for f in features if f['properties']['classification']['name'] == name]


def corners(ring):
    return sorted(map(tuple, ring[:-1]))


# ---- reading at a resolution ---------------------------------------------------------------------

def test_the_level_at_or_finer_than_the_grid_is_read_and_resampled_without_seams(tmp_path):
    level0 = random_image(600, 800, seed=1)
    write_slide(tmp_path / 's.tif', level0)
    with WholeSlide(str(tmp_path / 's.tif')) as slide:
        assert slide.mpp == LEVEL0_MPP and slide.level_downsamples == (1.0, 2.0, 4.0)
        assert [slide.level_for(d) for d in (0.95, 1, 1.5, 2, 3.9, 4, 13)] == [0, 0, 0, 1, 1, 2, 2]
        assert segmentation_grid(slide, mpp=1.0) == (2.0, 1.0)  # LUAD's 1 um: level 1 as it is
        assert np.array_equal(SlideView(slide, 2.0).read_all(strip=50), level0[::2, ::2])
        for mpp in (0.75, 1.35, 3.0, 0.47):  # level 0 reduced, level 1 reduced, level 2, level 0 enlarged
            downsample, used = segmentation_grid(slide, mpp)
            level = slide.level_for(downsample)
            source = level0[::int(slide.level_downsamples[level]), ::int(slide.level_downsamples[level])]
            scale = downsample / slide.level_downsamples[level]
            whole = SlideView(slide, downsample).read_all()
            height, width = whole.shape[:2]
            assert (height, width) == (int(600 / downsample), int(800 / downsample)) and used == mpp
            # the obviously correct path: PIL resizes the whole level (it rounds to 8 bits between its passes)
            pil = np.asarray(Image.fromarray(source).resize((width, height), Image.BICUBIC,
                                                            box=(0, 0, width * scale, height * scale)))
            difference = np.abs(whole.astype(int) - pil)
            assert difference.mean() < 0.3 and (difference > 2).mean() < 1e-3, mpp
            # strips and tiles of the grid are the same pixels as the whole grid, to the bit
            view = SlideView(slide, downsample, box=(13, 7, width - 20, height - 9))
            assert np.array_equal(np.concatenate([view.read(y, 37) for y in range(0, view.height, 37)]),
                                  whole[7:height - 2, 13:width - 7])


def test_resolution_comes_from_metadata_slide_mpp_or_a_level_and_is_never_invented(tmp_path):
    write_slide(tmp_path / 'bare.tif', random_image(256, 256, seed=2), mpp=None)
    with WholeSlide(str(tmp_path / 'bare.tif')) as slide:
        assert slide.mpp is None
        with pytest.raises(InputError, match=r'bare.tif: no resolution .* --slide_mpp .* --level'):
            segmentation_grid(slide, 1.0)
        assert segmentation_grid(slide, 1.0, slide_mpp=0.25) == (4.0, 1.0)
        assert segmentation_grid(slide, 1.0, level=1) == (2.0, None)
        assert segmentation_grid(slide, 1.0, slide_mpp=0.5, level=1) == (2.0, 1.0)
        with pytest.raises(InputError, match=r'--level 3 does not exist'):
            segmentation_grid(slide, 1.0, level=3)
        with pytest.raises(InputError, match=r"--mpp 0.2 is finer than the slide's finest level \(0.25 um per pixel\)"):
            segmentation_grid(slide, 0.2, slide_mpp=0.25)
        assert segmentation_grid(slide, 0.24, slide_mpp=0.25)[0] == pytest.approx(0.96)  # within 10 %: enlarged


# ---- tissue ---------------------------------------------------------------------------------------

def test_tissue_is_what_differs_from_the_glass_closed_without_specks_or_small_holes():
    pixel_um = 8.0
    thumbnail = np.full((80, 100, 3), GLASS, np.uint8)
    thumbnail[10:60, 10:70] = PAINT[2]                      # tissue, 400 x 480 um
    thumbnail[30:33, 30:33] = GLASS                         # a hole of 3 x 3 pixels (576 um2): filled
    thumbnail[20:40, 40:60] = GLASS                         # a hole of 25600 um2: kept
    thumbnail[70:74, 85:89] = PAINT[0]                      # a speck of 1024 um2: removed
    thumbnail[5:8, 80:95] = (150, 150, 150)                 # grey dust of 2880 um2: removed
    expected = np.zeros((80, 100), bool)
    expected[10:60, 10:70] = True
    expected[20:40, 40:60] = False
    assert saturation(np.array([[[255, 255, 255], [200, 40, 40], [0, 0, 0]]], np.uint8)).tolist() == [[0, 204, 0]]
    differ = np.argwhere(detect_tissue(thumbnail, pixel_um) != expected)
    # only at corners: the median filter cuts a convex one, the closing fills a concave one
    corner_pixels = np.array([(10, 10), (10, 69), (59, 10), (59, 69), (20, 40), (20, 59), (39, 40), (39, 59)])
    assert all(np.abs(corner_pixels - p).max(1).min() <= 2 for p in differ) and len(differ) < 20
    assert not detect_tissue(np.full((50, 50, 3), GLASS, np.uint8), pixel_um).any()  # glass only: no tissue
    noisy = np.clip(GLASS + np.random.default_rng(0).normal(0, 6, (50, 50, 3)), 0, 255).astype(np.uint8)
    assert not detect_tissue(noisy, pixel_um).any()  # nor on noisy glass
    assert detect_tissue(thumbnail, pixel_um, threshold=255).sum() == 0  # --tissue_saturation sets it


def test_tissue_map_maps_thumbnail_pixels_onto_the_grid_and_boxes_the_tissue():
    mask = np.zeros((10, 12), bool)
    mask[2:4, 5:9] = True
    tissue = TissueMap(mask, scale=0.25, grid_size=(40, 48))  # 4 x 4 grid pixels per thumbnail pixel
    assert np.array_equal(tissue.rows(0, 40), np.repeat(np.repeat(mask, 4, 0), 4, 1))
    assert tissue.box() == (20, 8, 16, 8)
    assert np.array_equal(tissue.rows(6, 5, 18, 4), np.repeat(np.repeat(mask, 4, 0), 4, 1)[6:11, 18:22])
    assert TissueMap(np.zeros((3, 3), bool), 0.5, (6, 6)).box() is None
    assert TissueMap.everywhere((5, 7)).box() == (0, 0, 7, 5)


# ---- areas ------------------------------------------------------------------------------------------

def test_areas_in_mm2_fractions_of_the_tissue_and_the_slide_stroma_area_ratio():
    counts = np.array([100, 0, 50, 300, 10_000])  # TE, NEC, LYM, TAS, background (luad)
    row = areas(counts, mpp=2.0, class_names=('TE', 'NEC', 'LYM', 'TAS'), dataset='luad')
    assert row['tissue_mm2'] == '0.001800' and row['TAS_mm2'] == '0.001200' and row['NEC_mm2'] == '0.000000'
    assert row['TE_fraction'] == f'{100 / 450:.6f}' and row['slide_stroma_area_ratio'] == '0.750000'
    assert 'stroma' not in row  # no clinical high/low call from a slide-wide ratio
    bcss = areas(np.array([300, 100, 0, 0, 0]), None, ('TUM', 'STR', 'LYM', 'NEC'), 'bcss')
    assert bcss['slide_stroma_area_ratio'] == '0.250000' and bcss['tissue_mm2'] == ''
    assert areas(np.array([0, 0, 0, 0, 9]), 1.0, ('TE', 'NEC', 'LYM', 'TAS'), 'luad')['slide_stroma_area_ratio'] == ''


# ---- one slide, the network replaced by paint colours ------------------------------------------------

def test_a_slide_segments_only_its_tissue_into_a_tiff_geojson_and_table_at_level0_scale(tmp_path, capsys):
    level0, classes = painted_slide()
    write_slide(tmp_path / 'painted.tif', level0)
    out, network = tmp_path / 'out', ColourClasses()
    run_cohort([('painted', str(tmp_path / 'painted.tif'))], network, settings(out))
    mask_path, geojson_path, overlay_path = slide_files(out, 'painted')

    with WholeSlide(str(tmp_path / 'painted.tif')) as slide:  # what the pipeline saw
        tissue = find_tissue(slide, 2.0, 1.0, settings(out))
        grid = SlideView(slide, 2.0).read_all()
    on_tissue = tissue.rows(0, 384)
    # tissue detection: the painted tissue (its little glass hole filled), not the speck
    painted_tissue = classes < BACKGROUND
    painted_tissue[240:264, 160:184], painted_tissue[330:370, 60:100] = True, False
    assert (on_tissue & painted_tissue).sum() / (on_tissue | painted_tissue).sum() > 0.97
    assert not on_tissue[330:370, 60:100].any() and on_tissue[240:264, 160:184].all()

    # the mask: the classes on tissue, background (4) on glass; level 0 of the TIFF is the 1-um grid
    mask = tifffile.imread(mask_path)
    expected = np.where(on_tissue, nearest_paint(grid), BACKGROUND)
    assert np.array_equal(mask, expected)

    # tiles: only those with tissue went through the network, every one of them did, the rest are counted
    [row] = table(out / 'cohort.csv')
    assert all((saturation(t) > 100).any() for t in network.tiles)
    assert len(network.tiles) == int(row['tiles_run']) > 0
    assert int(row['tiles_run']) + int(row['tiles_skipped']) == 11 * 8  # the 512 x 384 grid in 64-px tiles, 16 overlap
    assert int(row['tiles_skipped']) >= 20

    # the table: resolution, areas in mm2 (1 um2 a pixel), fractions, stroma area ratio
    counts = np.bincount(mask.ravel(), minlength=5)
    assert [row[c] for c in ('slide', 'mpp', 'level', 'width', 'height')] == ['painted', '1.0000', '1', '512', '384']
    assert float(row['tissue_mm2']) == counts[:4].sum() / 1e6 and float(row['TAS_mm2']) == counts[3] / 1e6
    assert float(row['TE_fraction']) == pytest.approx(counts[0] / counts[:4].sum(), abs=1e-6)
    assert float(row['slide_stroma_area_ratio']) == pytest.approx(counts[3] / (counts[0] + counts[3]), abs=1e-6)
    assert table(out / 'slides' / 'painted' / 'painted.csv') == [row]
    assert 'painted: 1.0000 um/px' in capsys.readouterr().out

    # OpenSlide opens the mask at its size and resolution, pyramid included, in the palette's colours
    with openslide.OpenSlide(str(mask_path)) as opened:
        assert opened.dimensions == (512, 384) and float(opened.properties['openslide.mpp-x']) == 1.0
        assert opened.level_dimensions == tuple((w, h) for h, w in pyramid_sizes(384, 512)) == ((512, 384), (256, 192))
        palette = np.asarray(DATASETS['luad'].palette, np.uint8).reshape(-1, 3)
        assert np.array_equal(np.asarray(opened.read_region((0, 0), 0, (512, 384)))[..., :3], palette[mask])
        assert np.array_equal(np.asarray(opened.read_region((0, 0), 1, (256, 192)))[..., :3], palette[mask[1::2, 1::2]])

    # GeoJSON: one feature per region and class, QuPath's classification, holes, level-0 pixels (2 a grid pixel)
    features = json.loads(geojson_path.read_text())['features']
    names = {f['properties']['classification']['name']: f['properties']['classification']['color'] for f in features}
    assert names == {'TE': [205, 51, 51], 'NEC': [0, 255, 0], 'LYM': [65, 105, 225], 'TAS': [255, 165, 0]}
    assert all(f['properties']['objectType'] == 'annotation' and f['geometry']['type'] == 'Polygon' for f in features)
    [[square, hole]] = rings_of(features, 'TE')  # class 0: grid [96, 224)^2, its hole [144, 176)^2
    assert corners(square) == [(192, 192), (192, 448), (448, 192), (448, 448)]
    assert corners(hole) == [(288, 288), (288, 352), (352, 288), (352, 352)]
    [[hole_region]] = rings_of(features, 'NEC')
    assert corners(hole_region) == corners(hole)
    [rectangle] = rings_of(features, 'LYM')  # class 2 holds the square (and the filled glass hole)
    assert any(corners(h) == corners(square) for h in rectangle[1:])
    [[disc]] = [rings for rings in rings_of(features, 'TAS') if rings[0][0][0] > 700]
    # r = 70 um = 140 level-0 px around (840, 320): every corner within twice the 4-um (8-px) tolerance
    assert np.abs(np.hypot(*(np.array(disc) - (840, 320)).T) - 140).max() <= 16
    for feature in features:
        rings = feature['geometry']['coordinates']
        assert all(ring[0] == ring[-1] and len(ring) >= 4 for ring in rings)
        polygon = shapely.Polygon(rings[0], rings[1:])  # valid, and GeoJSON's winding
        assert polygon.is_valid and polygon.exterior.is_ccw and not any(h.is_ccw for h in polygon.interiors)
        assert all(0 <= x <= 1024 and 0 <= y <= 768 for ring in rings for x, y in ring)

    # the overlay thumbnail: the mask's colours over the slide
    assert np.array_equal(np.asarray(Image.open(overlay_path)), overlay(PixelArray(grid), mask, DATASETS['luad'].palette))

    # a finished slide is kept; --overwrite redoes it in place
    tiles_run = len(network.tiles)
    run_cohort([('painted', str(tmp_path / 'painted.tif'))], network, settings(out))
    assert len(network.tiles) == tiles_run and '1 finished earlier' in capsys.readouterr().out
    run_cohort([('painted', str(tmp_path / 'painted.tif'))], network, settings(out, '--overwrite'))
    assert len(network.tiles) == 2 * tiles_run and os.listdir(out / 'slides') == ['painted']
    assert np.array_equal(tifffile.imread(mask_path), mask) and table(out / 'cohort.csv')[0]['slide'] == 'painted'


def test_a_slide_without_tissue_is_a_valid_empty_result(tmp_path):
    glass = np.clip(GLASS + np.random.default_rng(0).normal(0, 3, (256, 320, 3)), 0, 255).astype(np.uint8)
    write_slide(tmp_path / 'glass.tif', glass)
    network = ColourClasses()
    run_cohort([('glass', str(tmp_path / 'glass.tif'))], network, settings(tmp_path / 'out'))
    mask_path, geojson_path, _ = slide_files(tmp_path / 'out', 'glass')
    [row] = table(tmp_path / 'out' / 'cohort.csv')
    assert network.tiles == [] and row['tiles_run'] == '0' and int(row['tiles_skipped']) > 0
    assert (tifffile.imread(mask_path) == BACKGROUND).all() and json.loads(geojson_path.read_text())['features'] == []
    assert float(row['tissue_mm2']) == 0 and row['slide_stroma_area_ratio'] == '' and row['TE_fraction'] == ''


MEMORY_PROBE = """
import json, resource, sys
import numpy as np, tifffile, torch
from tests.test_wsi import PAINT, settings
from tool.wsi.cohort import run_cohort

width, height, folder = 2048, int(sys.argv[1]), sys.argv[2]

def tiles(d):  # tissue blobs of the four colours on glass, made tile by tile: the slide is never in memory
    rows, columns = np.mgrid[:256, :256]
    for y in range(0, height // d, 256):
        for x in range(0, width // d, 256):
            gy, gx = (rows + y) * d, (columns + x) * d
            colour = (gx // 300 + gy // 400) % 4
            blob = ((gx % 700) - 350) ** 2 + ((gy % 600) - 300) ** 2 < 250 ** 2
            yield np.where(blob[..., None], PAINT[colour], np.uint8(240)).astype(np.uint8)

with tifffile.TiffWriter(f'{folder}/tall.tif') as tiff:
    for i, d in enumerate((1, 4, 16)):
        tiff.write(tiles(d), shape=(height // d, width // d, 3), dtype=np.uint8, tile=(256, 256), photometric='rgb',
                   subfiletype=1 if i else 0, metadata=None, resolution=(1e4, 1e4), resolutionunit='CENTIMETER')

def logits(rgb):  # four "classes" from the pixels: cheap, the probe measures the pipeline, not a network
    x = torch.as_tensor(rgb).permute(0, 3, 1, 2).float() / 255
    return torch.cat((x, x.mean(1, keepdim=True)), 1)

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == 'darwin' else 2 ** 10)

before = peak_mb()
run_cohort([('tall', f'{folder}/tall.tif')], logits, settings(f'{folder}/out', '--tile', 256, '--overlap', 32))
print(json.dumps({'grown_mb': peak_mb() - before}))
"""


def test_memory_follows_the_slide_width_not_its_height(tmp_path):
    """A 2048-px-wide slide at 1 um, 1024 and 6144 rows: float probabilities of the whole grid would
    take 32 and 192 MB, the mask 2 and 12 MB. The pipeline holds a strip of tiles and keeps the mask
    on disk, so the taller slide's peak memory may only grow by what OpenSlide's tile cache (32 MB)
    holds beyond the small slide's 8 MB of decoded tiles (measured: 25 MB more). Freed large blocks
    go back to the system (MALLOC_MMAP_THRESHOLD_), so that the peak measures what is held."""
    grown = []
    for height in (1024, 6144):
        (tmp_path / str(height)).mkdir()
        probe = subprocess.run([sys.executable, '-c', MEMORY_PROBE, str(height), str(tmp_path / str(height))],
                               cwd=ROOT, env={**ENV, 'MALLOC_MMAP_THRESHOLD_': '131072'}, capture_output=True,
                               text=True, timeout=300)
        assert probe.returncode == 0, probe.stderr[-3000:]
        grown.append(json.loads(probe.stdout.splitlines()[-1])['grown_mb'])
        assert int(table(tmp_path / str(height) / 'out' / 'cohort.csv')[0]['height']) == height
    assert grown[1] - grown[0] < 40, grown


# ---- the command line with a (tiny) network ---------------------------------------------------------

def test_the_network_sees_the_resampled_tissue_tiles_as_blending_the_whole_box_would(checkpoint, predictor, tmp_path):
    level0, _ = painted_slide()
    texture = random_image(768, 1024, seed=3)  # texture, so that the network's classes vary
    level0 = np.where(level0.min(2, keepdims=True) < 200, (level0 * 0.6 + texture * 0.4).astype(np.uint8), level0)
    write_slide(tmp_path / 'slide.tif', level0)
    cli(checkpoint, tmp_path / 'slide.tif', tmp_path / 'out', '--mpp', 1.5, '--white_background', 'none')
    mask = tifffile.imread(slide_files(tmp_path / 'out', 'slide')[0])
    [row] = table(tmp_path / 'out' / 'cohort.csv')
    assert (row['mpp'], row['level'], mask.shape) == ('1.5000', '1', (256, 341))  # level 1, reduced 1.5 times

    with WholeSlide(str(tmp_path / 'slide.tif')) as slide:
        tissue = find_tissue(slide, 3.0, 1.5, settings(tmp_path))
        x0, y0, width, height = tissue.box()
        box = SlideView(slide, 3.0, tissue.box())
        scores = torch.cat([p for _, p in blended_rows(box, predictor, TILE, OVERLAP)], 1)  # every tile, no skipping
    on_tissue = tissue.rows(0, 256)
    assert (mask[~on_tissue] == BACKGROUND).all() and (mask[on_tissue] < BACKGROUND).all()
    inside = on_tissue[y0:y0 + height, x0:x0 + width]
    assert_argmax(mask[y0:y0 + height, x0:x0 + width][inside], scores[:, torch.from_numpy(inside)])
    assert len(np.unique(mask)) == 5


def test_bad_slides_stop_with_one_line_and_leave_nothing_half_written(checkpoint, tmp_path, capsys):
    write_slide(tmp_path / 'good.tif', painted_slide()[0])
    data = (tmp_path / 'good.tif').read_bytes()
    (tmp_path / 'truncated.tif').write_bytes(data[:-20_000])  # the last level's tiles are cut off
    middle = len(data) // 3
    (tmp_path / 'corrupt.tif').write_bytes(data[:middle] + bytes(1000) + data[middle + 1000:])  # tiles of level 0
    write_slide(tmp_path / 'bare.tif', painted_slide()[0], mpp=None)
    (tmp_path / 'list.csv').write_text('name\ngood.tif\n')
    (tmp_path / 'file').write_text('')
    base = ['--checkpoint', checkpoint, '--device', 'cpu', '--tile', TILE, '--overlap', OVERLAP]
    cases = [
        ([tmp_path / 'truncated.tif'], 'truncated.tif: OpenSlide cannot read'),
        ([tmp_path / 'corrupt.tif', '--level', 0, '--no_tissue_detection'],
         'corrupt.tif: OpenSlide cannot read a region'),
        ([tmp_path / 'bare.tif'], "bare.tif: no resolution in the slide's metadata"),
        ([tmp_path / 'good.tif', '--mpp', 0.3],
         "good.tif: --mpp 0.3 is finer than the slide's finest level (0.5 um per pixel)"),
        ([tmp_path / 'good.tif', '--out', tmp_path / 'file' / 'out'], 'cannot write here'),
        ([tmp_path / 'list.csv'], 'list.csv: a slide list needs a column named path or slide'),
        ([tmp_path / 'good.tif', '--mpp', 1, '--level', 1], '--mpp and --level: give one'),
    ]
    for extra, message in cases:
        err = expect_exit_2(capsys, *base, '--out', tmp_path / 'out', '--input', *extra)
        assert message in err, (extra, err)
        assert not (tmp_path / 'out' / 'slides').exists() or os.listdir(tmp_path / 'out' / 'slides') == []
    # given its resolution, the bare slide is segmented; at a level as it is, too (no areas then)
    cli(checkpoint, tmp_path / 'bare.tif', tmp_path / 'out', '--slide_mpp', 0.5)
    cli(checkpoint, tmp_path / 'bare.tif', tmp_path / 'level', '--level', 1)
    assert table(tmp_path / 'out' / 'cohort.csv')[0]['mpp'] == '1.0000'
    [row] = table(tmp_path / 'level' / 'cohort.csv')
    assert row['mpp'] == '' and row['tissue_mm2'] == '' and float(row['TE_fraction']) >= 0
    assert 'openslide.mpp-x' not in openslide.OpenSlide(str(slide_files(tmp_path / 'level', 'bare')[0])).properties


def test_amp_runs_the_network_in_bfloat16_on_a_cpu_that_has_it(checkpoint, monkeypatch, capsys):
    """The mechanism. How many pixels bfloat16 changes is a property of the trained model (a random
    one has near-ties everywhere): measured for the README with bench/bench_wsi.py."""
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: False)
    assert infer.inference_dtype(True, torch.device('cpu')) is None
    assert 'no bfloat16 instructions' in capsys.readouterr().out
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: True)
    assert infer.inference_dtype(True, torch.device('cpu')) is torch.bfloat16
    assert infer.inference_dtype(False, torch.device('cpu')) is None
    model = infer.deeplab_from_state_dict(infer.read_state_dict(checkpoint)).eval()
    rgb = np.stack([random_image(TILE, TILE, seed=s) for s in range(2)])
    half = infer.Predictor(model, torch.device('cpu'), amp_dtype=torch.bfloat16)(rgb)
    full = infer.Predictor(model, torch.device('cpu'))(rgb)
    assert half.dtype == torch.float32 and torch.equal(half, half.bfloat16().float())  # computed in bfloat16
    assert not torch.equal(full, full.bfloat16().float())


# ---- cohorts: folders and lists, resume after a kill, two processes -----------------------------------

def cohort_slides(folder):
    """Four small slides (1 um grids of 96 x 128 .. 192 x 256) of textured tissue on glass."""
    folder.mkdir()
    for i, (height, width) in enumerate(((384, 512), (512, 768), (192, 256), (256, 384))):
        level0 = np.full((height, width, 3), GLASS, np.uint8)
        rows, columns = np.mgrid[:height, :width]
        blob = ((rows - height / 2) / (height / 3)) ** 2 + ((columns - width / 2.5) / (width / 4)) ** 2 < 1
        level0[blob] = random_image(height, width, seed=40 + i)[blob] // 2 + PAINT[i] // 2
        write_slide(folder / f'{"abcd"[i]}.tif', level0)
    return sorted(folder.iterdir())


@pytest.fixture(scope='module')
def cohort(checkpoint, tmp_path_factory):
    """The slides and their masks from one uninterrupted run in this process (one thread)."""
    folder = tmp_path_factory.mktemp('cohort')
    slides = cohort_slides(folder / 'slides')
    (folder / 'list.csv').write_text('path,patient\n' + ''.join(f'slides/{p.name},{i}\n' for i, p in enumerate(slides)))
    cli(checkpoint, folder / 'list.csv', folder / 'out')  # a CSV list, paths relative to it
    masks = {p.stem: tifffile.imread(slide_files(folder / 'out', p.stem)[0]) for p in slides}
    return folder, masks


def start(argv, log):
    with open(log, 'wb') as output:
        return subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, env=ENV, stdout=output,
                                stderr=subprocess.STDOUT)


def test_a_killed_run_redoes_only_the_slide_it_was_in(checkpoint, cohort, tmp_path):
    folder, masks = cohort
    out = tmp_path / 'out'
    argv = ['4_infer.py', '--checkpoint', checkpoint, '--input', folder / 'slides', '--out', out, '--device', 'cpu',
            '--tile', TILE, '--overlap', OVERLAP]
    run = start(argv, tmp_path / 'first.txt')
    try:
        deadline = time.monotonic() + 120
        while not (out / 'slides' / 'a').is_dir():
            assert run.poll() is None and time.monotonic() < deadline, (tmp_path / 'first.txt').read_text()
            time.sleep(0.005)
        run.send_signal(signal.SIGKILL)  # in the middle of slide b (the largest)
        run.wait()
    finally:
        run.kill()
    done = sorted(p.name for p in (out / 'slides').iterdir() if not p.name.startswith('.'))
    assert done == ['a']
    kept = (out / 'slides' / 'a' / 'a-mask.tiff').stat()

    again = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert '4 slide(s), 1 finished earlier' in again.stdout
    assert [line.split(':')[0] for line in again.stdout.splitlines() if ' um/px' in line] == ['b', 'c', 'd']
    assert (out / 'slides' / 'a' / 'a-mask.tiff').stat().st_mtime_ns == kept.st_mtime_ns  # not redone
    assert sorted(os.listdir(out / 'slides')) == ['a', 'b', 'c', 'd']  # no partial folder left
    assert [r['slide'] for r in table(out / 'cohort.csv')] == ['a', 'b', 'c', 'd']
    for name, mask in masks.items():
        assert np.array_equal(tifffile.imread(slide_files(out, name)[0]), mask), name


def test_a_killed_run_resumes_inside_the_slide_from_its_last_strip_to_the_same_mask(checkpoint, tmp_path, capsys):
    """SIGKILL in the middle of a tall slide (a 1-um grid of 1200 x 96: 49 rows of tiles, an overlap
    over half a tile, so that two or three rows of tiles above the row resumed at run again): the
    rerun goes on from the progress record and the mask is an uninterrupted run's, byte for byte."""
    height, width = 2400, 192  # level 0 at 0.5 um
    rows, columns = np.mgrid[:height, :width]
    tissue = (columns > 30 + 40 * np.sin(rows / 150)) & ~((rows > 1000) & (rows < 1400))  # glass between
    level0 = np.where(tissue[..., None], random_image(height, width, seed=7) // 2 + PAINT[1] // 2, np.uint8(GLASS))
    write_slide(tmp_path / 'tall.tif', level0)
    flags = ['--device', 'cpu', '--tile', TILE, '--overlap', 40]
    cli(checkpoint, tmp_path / 'tall.tif', tmp_path / 'whole', *flags)  # uninterrupted, in this process
    assert 'resuming' not in capsys.readouterr().out
    out = tmp_path / 'out'
    argv = ['4_infer.py', '--checkpoint', checkpoint, '--input', tmp_path / 'tall.tif', '--out', out, *flags]
    record = out / 'slides' / '.tall.partial' / '.progress.json'
    run = start(argv, tmp_path / 'first.txt')
    try:
        deadline = time.monotonic() + 120
        while True:
            assert run.poll() is None and time.monotonic() < deadline, (tmp_path / 'first.txt').read_text()
            try:
                if json.loads(record.read_text())['rows'] >= 1200 // 3:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.005)
        run.send_signal(signal.SIGKILL)
        run.wait()
    finally:
        run.kill()
    assert not (out / 'slides' / 'tall').exists() and 'resuming' not in (tmp_path / 'first.txt').read_text()

    again = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    [(row, grid_height, tiles_done)] = re.findall(r'^tall: resuming at row (\d+) of (\d+) \((\d+) tiles done\)$',
                                                  again.stdout, re.M)
    assert 1200 // 3 <= int(row) < int(grid_height) == 1200 and int(tiles_done) > 0
    [resumed], [whole] = table(out / 'cohort.csv'), table(tmp_path / 'whole' / 'cohort.csv')
    assert int(resumed['tiles_run']) > int(tiles_done)
    timing = ('seconds', 'tiles_per_second')
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in whole.items() if k not in timing}
    mask = tifffile.imread(slide_files(out, 'tall')[0])
    assert mask.shape == (1200, 96)
    assert np.array_equal(mask, tifffile.imread(slide_files(tmp_path / 'whole', 'tall')[0]))
    assert len(np.unique(mask)) == 5 and os.listdir(out / 'slides') == ['tall']  # no partial folder left
    assert sorted(os.listdir(out / 'slides' / 'tall')) == sorted(os.listdir(tmp_path / 'whole' / 'slides' / 'tall'))


class StopsAfter(ColourClasses):
    """ColourClasses that stops the run (as Ctrl-C would) when it is given more than `tiles` tiles."""

    def __init__(self, tiles):
        super().__init__()
        self.limit = tiles

    def __call__(self, rgb):
        if len(self.tiles) + len(rgb) > self.limit:
            raise KeyboardInterrupt
        return super().__call__(rgb)


def test_a_killed_run_goes_on_only_with_the_same_fingerprint_and_not_under_overwrite(tmp_path, capsys):
    """An interrupted slide keeps its partial folder and progress record; the rerun goes on from
    it only if nothing the mask depends on changed (a setting, a new one too, the checkpoint file,
    the slide file) and without --overwrite; otherwise the slide starts over from its first tile."""
    from tool.wsi.cohort import mask_fingerprint
    write_slide(tmp_path / 'painted.tif', painted_slide()[0])
    (tmp_path / 'weights.pth').write_bytes(b'weights')
    slides = [('painted', str(tmp_path / 'painted.tif'))]
    out, partial = tmp_path / 'out', tmp_path / 'out' / 'slides' / '.painted.partial'
    base = ['--checkpoint', tmp_path / 'weights.pth']
    run_cohort(slides, ColourClasses(), settings(tmp_path / 'whole', *base))
    mask = tifffile.imread(slide_files(tmp_path / 'whole', 'painted')[0])
    [row] = table(tmp_path / 'whole' / 'cohort.csv')
    total = int(row['tiles_run'])

    def interrupted(*extra):
        with pytest.raises(KeyboardInterrupt):
            run_cohort(slides, StopsAfter(total // 2), settings(out, *base, *extra))
        assert json.loads((partial / '.progress.json').read_text())['rows'] > 0
        assert not (out / 'slides' / 'painted').exists()

    def rerun(*extra):
        network = ColourClasses()
        run_cohort(slides, network, settings(out, *base, *extra))
        assert np.array_equal(tifffile.imread(slide_files(out, 'painted')[0]), mask) and not partial.exists()
        timing = ('seconds', 'tiles_per_second')
        assert {k: v for k, v in table(out / 'cohort.csv')[0].items() if k not in timing} == \
            {k: v for k, v in row.items() if k not in timing}
        resumed = re.findall(r'^painted: resuming at row (\d+) of 384 \((\d+) tiles done\)$',
                             capsys.readouterr().out, re.M)
        assert len(network.tiles) == total - (int(resumed[0][1]) if resumed else 0)
        return resumed

    interrupted()
    [(_, done)] = rerun()  # went on from the record
    assert 0 < int(done) < total
    shutil.rmtree(out / 'slides' / 'painted')
    for changed in (['--batch_size', 5], ['--overwrite']):  # the paint colours' mask is the same
        interrupted()
        assert rerun(*changed) == []  # started over: every tile run again
        shutil.rmtree(out / 'slides' / 'painted')

    # the fingerprint: what the mask depends on, not where it goes or how fast it is made
    def fingerprint(*extra, path=slides[0][1], **new):
        args = settings(out, *base, *extra)
        vars(args).update(new)
        return mask_fingerprint(path, args, ColourClasses())
    same = fingerprint()
    assert same == fingerprint('--out', tmp_path / 'elsewhere', '--workers', 7, '--overwrite', '--debug', rank=3)
    assert len({same, fingerprint('--batch_size', 3), fingerprint('--dataset', 'bcss'), fingerprint(new_flag=1),
                fingerprint(path=str(tmp_path / 'weights.pth'))}) == 5
    os.utime(tmp_path / 'weights.pth', ns=(0, 0))  # a checkpoint rewritten in place
    assert fingerprint() != same


def test_two_processes_under_torchrun_share_the_slides_and_complete_the_table(checkpoint, cohort, tmp_path):
    folder, masks = cohort
    env = {k: v for k, v in ENV.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    argv = ['-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone', '4_infer.py', '--checkpoint',
            checkpoint, '--input', folder / 'slides', '--out', tmp_path / 'out', '--device', 'cpu', '--tile', TILE,
            '--overlap', OVERLAP]
    done = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    segmented = {line.split(': ')[1]: line.split(':')[0] for line in done.stdout.splitlines()
                 if line.startswith('process ') and ' um/px' in line}
    assert segmented == {'a': 'process 0/2', 'b': 'process 1/2', 'c': 'process 0/2', 'd': 'process 1/2'}
    assert [r['slide'] for r in table(tmp_path / 'out' / 'cohort.csv')] == ['a', 'b', 'c', 'd']
    for name, mask in masks.items():
        assert np.array_equal(tifffile.imread(slide_files(tmp_path / 'out', name)[0]), mask), name
