"""Synthetic whole slides whose truth is known: patches of tool/data/synth.py laid out on glass.

    python -m tool.data.synth_slide --out slides/ [--variant heldout] [--cells 12] [--seed 0]

writes into --out:
    <name>.tiff           a tiled pyramidal RGB TIFF as scanners write them (levels 1, 2, 4, 8, 16),
                          level 0 at --level0_mpp (0.5 um per pixel, 20x) with its resolution tags:
                          OpenSlide opens it and reads the resolution
    <name>-truth.png      the classes at the patches' own resolution (--patch_mpp, 1 um per pixel,
                          LUAD-HistoSeg's): the grid 4_infer.py segments on, 4 = glass and white
    <name>-cells.png      1 inside the tissue's cells, 0 on the glass around: white inside the
                          tissue (truth 4 where this is 1) is the air of alveoli and lumens
    <name>-patches/img, mask   the same patches on their own, to score the model on patches

The slide is a square of --cells x --cells cells of one patch each; a blob of them (an ellipse
with a wavy edge) holds tissue, test-split patches in reading order, the rest is glass rendered
as the generator renders glass. Inside the tissue, the patches' own white regions (luad) are the
air of alveoli and lumens, background in the truth as in the dataset's labels. Level 0 is the
model-resolution canvas enlarged bicubically, and every coarser level is level 0 reduced by box
averaging, so a reader that resamples back to the patch resolution sees what the patches are.
"""
import argparse
import os

import numpy as np
import tifffile
from PIL import Image

from tool.core.errors import InputError, run_cli
from tool.core.files import atomic_write, save_palette_png, save_png
from tool.core.log import log
from tool.data import synth
from tool.data.datasets import BACKGROUND, DATASETS

LEVEL_DOWNSAMPLES = (1, 2, 4, 8, 16)
TIFF_TILE = 256


def tissue_cells(cells, rng):
    """bool (cells, cells): the cells holding tissue, an ellipse whose radius wavers with the angle,
    a glass margin of at least one cell all round."""
    y, x = (np.mgrid[:cells, :cells] + 0.5 - cells / 2) / (cells / 2 - 1)
    angle = np.arctan2(y, x)
    waves = sum(rng.uniform(0, 0.12) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    return np.hypot(x / 1.0, y / 0.8) <= 1 + waves - 0.12


def glass(rng, size, variant):
    """A patch of glass as the generator renders the glass inside its patches."""
    h = np.full((size, size), 0.01, np.float32)
    e = 0.03 + 0.01 * rng.random((size, size), dtype=np.float32)
    return synth.render(rng, h, e, variant)


def layout(dataset, patch_size, cells, seed, variant):
    """(rgb (n, n, 3), truth (n, n), tissue cells (n, n) bool, [(rgb, mask) of each tissue patch]) with
    n = cells * patch_size."""
    rng = np.random.default_rng([seed, 7])
    bank = synth.stamp_bank(seed, dataset)
    n = cells * patch_size
    rgb, truth = np.empty((n, n, 3), np.uint8), np.full((n, n), BACKGROUND, np.uint8)
    patches = []
    tissue = tissue_cells(cells, rng)
    for row, column in np.ndindex(cells, cells):
        box = np.s_[row * patch_size:(row + 1) * patch_size, column * patch_size:(column + 1) * patch_size]
        if tissue[row, column]:
            patch, mask = synth.make_patch(synth.patch_rng(seed, dataset, 'test', len(patches)), bank, patch_size,
                                           dataset, variant)
            rgb[box], truth[box] = patch, mask
            patches.append((patch, mask))
        else:
            rgb[box] = glass(rng, patch_size, variant)
    return rgb, truth, np.kron(tissue, np.ones((patch_size, patch_size), bool)), patches


def write_pyramid(path, level0, mpp):
    """A tiled (256), zlib, pyramidal RGB TIFF: level 0 and its box-averaged reductions, each with
    its resolution."""
    image = Image.fromarray(level0)
    with atomic_write(path) as tmp, tifffile.TiffWriter(tmp) as tiff:
        for index, downsample in enumerate(LEVEL_DOWNSAMPLES):
            size = (level0.shape[1] // downsample, level0.shape[0] // downsample)
            level = level0 if downsample == 1 else np.asarray(image.resize(size, Image.BOX))
            tiff.write(level, tile=(TIFF_TILE, TIFF_TILE), photometric='rgb', compression='zlib', metadata=None,
                       subfiletype=1 if index else 0,
                       resolution=(1e4 / (mpp * downsample),) * 2, resolutionunit='CENTIMETER')


def build_slide(out, name, dataset='luad', patch_size=96, cells=12, seed=0, variant='default', patch_mpp=1.0,
                level0_mpp=0.5):
    """Write the slide, its truth and its patches into `out`; returns the number of tissue patches."""
    rgb, truth, cells_mask, patches = layout(dataset, patch_size, cells, seed, synth.VARIANTS[variant])
    scale = patch_mpp / level0_mpp
    size = round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)
    level0 = np.asarray(Image.fromarray(rgb).resize(size, Image.BICUBIC))
    write_pyramid(os.path.join(out, f'{name}.tiff'), level0, level0_mpp)
    save_palette_png(truth, DATASETS[dataset].palette, os.path.join(out, f'{name}-truth.png'))
    save_palette_png(cells_mask, [0, 0, 0, 255, 255, 255], os.path.join(out, f'{name}-cells.png'))
    for index, (patch, mask) in enumerate(patches):
        file = f'{name}-{index:04d}.png'
        save_png(patch, os.path.join(out, f'{name}-patches', 'img', file))
        save_palette_png(mask, DATASETS[dataset].palette, os.path.join(out, f'{name}-patches', 'mask', file))
    return len(patches)


def main(args):
    if args.patch_mpp < args.level0_mpp:
        raise InputError(f'--patch_mpp {args.patch_mpp:g}: a slide finer than its patches needs --level0_mpp '
                         f'at most that (got {args.level0_mpp:g})')
    name = args.name or f'synth-{args.variant}-{args.seed}'
    count = build_slide(args.out, name, args.dataset, args.size, args.cells, args.seed, args.variant, args.patch_mpp,
                        args.level0_mpp)
    log.info(f'{os.path.join(args.out, name)}.tiff: {args.cells} x {args.cells} cells of {args.size} px, '
             f'{count} of tissue; truth {name}-truth.png at {args.patch_mpp:g} um per pixel')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--out', required=True, help='folder for the slide, its truth and its patches')
    parser.add_argument('--name', help='file name stem (default synth-<variant>-<seed>)')
    parser.add_argument('--dataset', default='luad', choices=synth.GENERATED)
    parser.add_argument('--variant', default='default', choices=sorted(synth.VARIANTS))
    parser.add_argument('--size', type=int, default=96, help='patch size in pixels (of the patch resolution)')
    parser.add_argument('--cells', type=int, default=12, help='the slide is cells x cells patches')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--patch_mpp', type=float, default=1.0, help='um per pixel of the patches and the truth')
    parser.add_argument('--level0_mpp', type=float, default=0.5, help='um per pixel of the slide\'s level 0')
    return parser.parse_args(argv)


if __name__ == '__main__':
    run_cli(main, parse_args())
