"""Synthetic H&E-like tissue patches with exact masks, in the layout of the released datasets.

    python -m tool.synth --out datasets/SYNTH-LUAD --dataset luad
    python -m tool.synth --out datasets/SYNTH-BCSS --dataset bcss
    python -m tool.synth --figure docs/synth_examples.png

writes train/ (patch label in the file name, in the dataset's style), train_gt/ (the pixel
truth of the train patches, which real datasets do not have), val/img, val/mask, test/img,
test/mask. Masks are palette PNGs; 4 is white background (luad only).

How a patch is made: a few tissue types get smooth random fields and each pixel takes the
largest (irregular borders); types covering less than MIN_FRACTION are dropped so that the
patch label (types present in the mask) names only visible tissue. Each type paints
haematoxylin (H) and eosin (E) concentration maps with its own texture:
    tumour       large pleomorphic nuclei in nests on pinkish-purple cytoplasm
    necrosis     pale granular eosinophilic debris with small nuclear fragments
    lymphocytes  densely packed small, round, very dark nuclei
    stroma       wavy oriented pink fibres with sparse spindle-shaped nuclei
and the concentrations become RGB through Beer-Lambert with per-patch stain vectors and
strengths (stain variation), so tumour and lymphocytes are both purple and necrosis and stroma
both pink: a classifier needs texture, not only mean colour.

Every patch has its own RNG seeded by (seed, dataset, split, index): the same seed gives the
same bytes, and a longer run extends a shorter one.
"""
import argparse
import functools
import os
import shutil
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tool.data import BACKGROUND, CLASS_NAMES, PALETTES, label_from_mask
from tool.io import InputError, run_cli, save_palette_png, save_png

TISSUES = ('tumour', 'necrosis', 'lymphocytes', 'stroma')
# Class index of each tissue type in each dataset's label order.
CLASS_INDEX = {'luad': {'tumour': 0, 'necrosis': 1, 'lymphocytes': 2, 'stroma': 3},
               'bcss': {'tumour': 0, 'stroma': 1, 'lymphocytes': 2, 'necrosis': 3}}
DATASETS = ('luad', 'bcss')
SPLITS = ('train', 'val', 'test')
MIN_FRACTION = 0.04        # a tissue type covering less of the patch is removed from it
MAX_BACKGROUND = 0.45      # keep most of a patch tissue, as in the real crops
TISSUES_PER_PATCH = (0.3, 0.4, 0.22, 0.08)  # P(1, 2, 3, 4 types drawn before pruning)
BACKGROUND_RATE = {'luad': 0.4, 'bcss': 0.0}
# Optical density per unit concentration (R, G, B): typical H&E stain vectors.
STAIN_H = np.array([0.5626, 0.7201, 0.4062])
STAIN_E = np.array([0.2159, 0.8012, 0.5581])
STAMP_VARIANTS = 48
MARGIN = 16                # canvas padding so a nucleus stamp never needs clipping


# ---- smooth random fields ----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def upsampling_weights(size, grid):
    """Bilinear upsampling from `grid` to `size` samples: left neighbour index and its weight."""
    x = np.clip((np.arange(size) + 0.5) * grid / size - 0.5, 0, grid - 1)
    low = np.minimum(np.floor(x).astype(int), grid - 2)
    return low, (x - low).astype(np.float32)


def smooth_noise(rng, size, grid):
    """Zero-mean noise with features about size/grid pixels wide: a (grid, grid) normal sample
    upsampled bilinearly. Element-wise, not a matrix product: no BLAS threads, whose
    summation order could change the bytes between machines."""
    low, w = upsampling_weights(size, grid)
    noise = rng.standard_normal((grid, grid), dtype=np.float32)
    rows = noise[low] * (1 - w)[:, None] + noise[low + 1] * w[:, None]
    return rows[:, low] * (1 - w) + rows[:, low + 1] * w


def lookup(grid, fy, fx):
    """Bilinear interpolation of `grid` at fractional coordinates (fy, fx), wrapping around."""
    y0, x0 = np.floor(fy), np.floor(fx)
    wy, wx = fy - y0, fx - x0
    y0, x0 = y0.astype(int) % grid.shape[0], x0.astype(int) % grid.shape[1]
    y1, x1 = (y0 + 1) % grid.shape[0], (x0 + 1) % grid.shape[1]
    return ((grid[y0, x0] * (1 - wx) + grid[y0, x1] * wx) * (1 - wy)
            + (grid[y1, x0] * (1 - wx) + grid[y1, x1] * wx) * wy)


@functools.lru_cache(maxsize=None)
def pixel_grid(size):
    return np.mgrid[0:size, 0:size].astype(np.float32)


# ---- nuclei ------------------------------------------------------------------------------------

def nucleus_stamp(rng, a, b, angle, irregularity, texture):
    """H concentration of one nucleus: an ellipse with semi-axes a, b turned by `angle`, its
    outline bumped by random angular harmonics, chromatin mottled by `texture`."""
    r = int(np.ceil(max(a, b))) + 2
    y, x = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float32)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    theta = np.arctan2(v, u)
    outline = 1 + sum(irregularity * rng.normal() / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
                      for k in (2, 3, 5))
    d = np.sqrt((u / a) ** 2 + (v / b) ** 2) / outline
    inside = 1 / (1 + np.exp((d - 1) * 10))  # soft edge, about one pixel wide
    chromatin = 1 + texture * rng.standard_normal(d.shape).astype(np.float32)
    return (inside * chromatin).astype(np.float32)


class StampBank:
    """Precomputed nuclei per tissue type: drawing a patch only copies them into place."""

    def __init__(self, rng):
        self.tumour = [self.tumour_nucleus(rng) for _ in range(STAMP_VARIANTS)]
        self.lymphocyte = [nucleus_stamp(rng, r, r * rng.uniform(0.85, 1), rng.uniform(0, np.pi), 0.05, 0.08)
                           for r in rng.uniform(2.6, 3.8, STAMP_VARIANTS)]
        self.fragment = [nucleus_stamp(rng, r, r * rng.uniform(0.5, 1), rng.uniform(0, np.pi), 0.3, 0.15)
                         for r in rng.uniform(0.8, 2.2, STAMP_VARIANTS)]
        # Spindle nuclei follow the fibres: one set per orientation bin.
        self.spindle_angles = np.linspace(0, np.pi, 12, endpoint=False)
        self.spindle = [[nucleus_stamp(rng, rng.uniform(6, 11), rng.uniform(1.3, 2.3), angle, 0.08, 0.1)
                         for _ in range(STAMP_VARIANTS // 4)] for angle in self.spindle_angles]

    @staticmethod
    def tumour_nucleus(rng):
        """Vesicular: a darker rim (chromatin on the membrane), paler centre, often a nucleolus."""
        a = rng.uniform(5, 9)
        stamp = nucleus_stamp(rng, a, a * rng.uniform(0.65, 1), rng.uniform(0, np.pi), 0.12, 0.25)
        r = stamp.shape[0] // 2
        y, x = np.mgrid[-r:r + 1, -r:r + 1]
        stamp *= 0.75 + 0.25 * np.clip(np.hypot(x, y) / a, 0, 1)
        if rng.random() < 0.6:
            cy, cx = rng.uniform(-a / 3, a / 3, 2)
            stamp += 0.5 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 1.2 ** 2)) * (stamp > 0.3)
        return stamp


def place(layer, stamps, ys, xs, strengths):
    """Stamp nuclei centred at (ys, xs) onto a padded layer; overlaps keep the darker."""
    for stamp, y, x, s in zip(stamps, ys, xs, strengths):
        r = stamp.shape[0] // 2
        window = layer[y + MARGIN - r:y + MARGIN + r + 1, x + MARGIN - r:x + MARGIN + r + 1]
        np.maximum(window, stamp * s, out=window)


def sample_points(rng, where, density, size):
    """Poisson points (density per pixel) kept where the boolean map `where` is true."""
    n = rng.poisson(density * size * size)
    ys, xs = rng.integers(0, size, (2, n))
    keep = where[ys, xs]
    return ys[keep], xs[keep]


# ---- tissue textures: (H, E) concentration maps and nuclei for one tissue type ------------------

def paint_tumour(rng, bank, size, region, nuclei):
    nests = smooth_noise(rng, size, 10)
    h = 0.28 + 0.06 * smooth_noise(rng, size, 16) + 0.1 * (nests > 0)
    e = 0.38 + 0.08 * smooth_noise(rng, size, 16) - 0.12 * (nests < -0.3)
    ys, xs = sample_points(rng, region & (nests > -0.1), 1 / 90, size)
    place(nuclei, [bank.tumour[k] for k in rng.integers(0, STAMP_VARIANTS, len(ys))], ys, xs,
          rng.uniform(0.9, 1.4, len(ys)))
    return h, e


def paint_necrosis(rng, bank, size, region, nuclei):
    # Granular debris (~3 px grains) under a blotchy basophilic haze of dissolved chromatin.
    granules = smooth_noise(rng, size, size // 3)
    haze = np.clip(smooth_noise(rng, size, 8), 0, None)
    h = 0.08 + 0.06 * np.abs(granules) + 0.15 * haze
    e = 0.5 + 0.1 * smooth_noise(rng, size, 14) + 0.15 * granules
    # Karyorrhexis: each dead nucleus breaks into a small clump of dark fragments.
    cy, cx = sample_points(rng, region, 1 / 400, size)
    count = rng.integers(3, 8, len(cy))
    ys = np.clip(np.repeat(cy, count) + rng.integers(-5, 6, count.sum()), 0, size - 1)
    xs = np.clip(np.repeat(cx, count) + rng.integers(-5, 6, count.sum()), 0, size - 1)
    place(nuclei, [bank.fragment[k] for k in rng.integers(0, STAMP_VARIANTS, len(ys))], ys, xs,
          rng.uniform(0.8, 1.4, len(ys)))
    return h, e


def paint_lymphocytes(rng, bank, size, region, nuclei):
    h = 0.26 + 0.05 * smooth_noise(rng, size, 20)
    e = 0.3 + 0.05 * smooth_noise(rng, size, 20)
    # Packed like a jittered grid: dense but rarely overlapping.
    spacing = rng.uniform(7.5, 9)
    centres = np.arange(spacing / 2, size, spacing)
    ys, xs = np.meshgrid(centres, centres, indexing='ij')
    ys = np.clip(np.round(ys.ravel() + rng.uniform(-2.5, 2.5, ys.size)), 0, size - 1).astype(int)
    xs = np.clip(np.round(xs.ravel() + rng.uniform(-2.5, 2.5, xs.size)), 0, size - 1).astype(int)
    keep = region[ys, xs] & (rng.random(ys.size) < 0.88)
    ys, xs = ys[keep], xs[keep]
    place(nuclei, [bank.lymphocyte[k] for k in rng.integers(0, STAMP_VARIANTS, len(ys))], ys, xs,
          rng.uniform(2.0, 2.6, len(ys)))
    return h, e


def paint_stroma(rng, bank, size, region, nuclei):
    angle = rng.uniform(0, np.pi)
    yy, xx = pixel_grid(size)
    # Fibres: noise stretched ~30 px along `angle` and ~3.5 px across it gives broken parallel
    # streaks; a smooth displacement across the fibres makes them wavy.
    along = xx * np.cos(angle) + yy * np.sin(angle)
    across = -xx * np.sin(angle) + yy * np.cos(angle) + 5 * smooth_noise(rng, size, 4)
    streaks = lookup(rng.standard_normal((24, 256), dtype=np.float32), along / 30, across / 3.5)
    fibres = np.clip(0.45 + 0.55 * streaks, 0, 1)
    h = 0.05 + 0.03 * fibres
    e = 0.4 + 0.5 * fibres
    ys, xs = sample_points(rng, region, 1 / 600, size)
    turn = np.abs(bank.spindle_angles[:, None] - (angle + rng.normal(0, 0.15, len(ys))) % np.pi)
    bins = np.argmin(np.minimum(turn, np.pi - turn), axis=0)
    place(nuclei, [bank.spindle[b][k] for b, k in zip(bins, rng.integers(0, STAMP_VARIANTS // 4, len(ys)))],
          ys, xs, rng.uniform(1.2, 1.7, len(ys)))
    return h, e


PAINTERS = {'tumour': paint_tumour, 'necrosis': paint_necrosis, 'lymphocytes': paint_lymphocytes,
            'stroma': paint_stroma}


# ---- one patch ---------------------------------------------------------------------------------

def draw_regions(rng, size, dataset):
    """Mask (size, size) uint8 of class indices (4 = background), every present class covering
    at least MIN_FRACTION, at least one tissue class, background at most MAX_BACKGROUND."""
    fields = {}
    k = rng.choice(len(TISSUES_PER_PATCH), p=TISSUES_PER_PATCH) + 1
    for tissue in rng.choice(TISSUES, k, replace=False):
        fields[CLASS_INDEX[dataset][tissue]] = (smooth_noise(rng, size, rng.integers(3, 7))
                                                + 0.3 * smooth_noise(rng, size, 24) + rng.uniform(-0.3, 0.3))
    if rng.random() < BACKGROUND_RATE[dataset]:
        fields[BACKGROUND] = smooth_noise(rng, size, rng.integers(3, 6)) + 0.3 * smooth_noise(rng, size, 24) - 0.4
    while True:
        mask = largest_field(fields)
        fraction = np.bincount(mask.ravel(), minlength=BACKGROUND + 1) / mask.size
        if fraction[BACKGROUND] > MAX_BACKGROUND:
            fields[BACKGROUND] -= 0.2
            continue
        # Drop the smallest tissue below the threshold; the largest always has >= 0.55 / 4.
        small = [c for c in fields if c != BACKGROUND and fraction[c] < MIN_FRACTION]
        if not small:
            return mask
        del fields[min(small, key=lambda c: fraction[c])]


def largest_field(fields):
    """Per pixel, the class whose field is largest (ties: the first drawn); a loop of
    element-wise maxima is several times faster than argmax over a stacked axis."""
    classes = iter(fields)
    first = next(classes)
    mask = np.full(fields[first].shape, first, np.uint8)
    best = fields[first].copy()
    for c in classes:
        wins = fields[c] > best
        mask[wins] = c
        np.maximum(best, fields[c], out=best)
    return mask


def blur3(x):
    """[1 2 1]/4 in both directions, edges repeated: the optics' slight softness."""
    p = np.pad(x, 1, mode='edge')
    x = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    return (x[:, :-2] + 2 * x[:, 1:-1] + x[:, 2:]) / 4


def render(rng, h, e):
    """Beer-Lambert: RGB = 255 exp(-(h * H_stain + e * E_stain)), with this patch's stains."""
    stains = [s + rng.normal(0, 0.05, 3) for s in (STAIN_H, STAIN_E)]
    stain_h, stain_e = [(s / np.linalg.norm(s)).astype(np.float32) for s in stains]
    od = (rng.uniform(0.75, 1.3) * blur3(h)[:, :, None] * stain_h
          + rng.uniform(0.7, 1.35) * blur3(e)[:, :, None] * stain_e + np.float32(0.02))
    rgb = 255 * np.exp(-od) + rng.uniform(-4, 4, od.shape).astype(np.float32)  # sensor noise
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def make_patch(rng, bank, size, dataset):
    """(rgb uint8 (size, size, 3), mask uint8 (size, size))."""
    mask = draw_regions(rng, size, dataset)
    h = np.zeros((size, size), np.float32)
    e = np.zeros((size, size), np.float32)
    nuclei = np.zeros((size + 2 * MARGIN, size + 2 * MARGIN), np.float32)
    for tissue in TISSUES:
        region = mask == CLASS_INDEX[dataset][tissue]
        if region.any():
            tissue_h, tissue_e = PAINTERS[tissue](rng, bank, size, region, nuclei)
            h[region], e[region] = tissue_h[region], tissue_e[region]
    # Glass: nearly no stain. Nuclei stop at the tissue edge.
    glass = mask == BACKGROUND
    h[glass], e[glass] = 0.01, 0.03 + 0.01 * rng.random(glass.sum(), dtype=np.float32)
    h = np.maximum(h, np.where(glass, 0, nuclei[MARGIN:-MARGIN, MARGIN:-MARGIN]))
    return render(rng, h, e), mask


def patch_rng(seed, dataset, split, index):
    return np.random.default_rng([seed, DATASETS.index(dataset), SPLITS.index(split), index])


def stamp_bank(seed, dataset):
    return StampBank(np.random.default_rng([seed, DATASETS.index(dataset), len(SPLITS)]))


def patch_name(dataset, split, index, label):
    if dataset == 'luad':
        tag = f'-[{" ".join(str(int(v)) for v in label)}]' if split == 'train' else ''
        return f'synth{"" if split == "train" else "-" + split}-{index:06d}{tag}.png'
    tag = f'[{"".join(str(int(v)) for v in label)}]' if split == 'train' else ''
    return f'SYNTH{"" if split == "train" else "-" + split}_xmin0_ymin{index}+0{tag}.png'


# ---- dataset and figure -------------------------------------------------------------------------

def write_dataset(out, dataset, size, counts, seed):
    """Write every split into a temporary folder beside `out`, then rename it to `out`, so an
    interrupted run leaves no half dataset. Returns per-split class counts."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise InputError(f'{out}: exists and is not empty; remove it or choose another --out')
    out = os.path.abspath(out)
    tmp = os.path.join(os.path.dirname(out), f'.{os.path.basename(out)}.partial-{os.getpid()}')
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise InputError(f'{out}: cannot create the dataset here ({e.strerror})') from None
    try:
        bank = stamp_bank(seed, dataset)
        summary = {}
        for split in SPLITS:
            images, masks = (('train', 'train_gt') if split == 'train'
                             else (os.path.join(split, 'img'), os.path.join(split, 'mask')))
            present = np.zeros(BACKGROUND, int)
            for index in range(counts[split]):
                rgb, mask = make_patch(patch_rng(seed, dataset, split, index), bank, size, dataset)
                label = label_from_mask(mask)
                name = patch_name(dataset, split, index, label)
                save_png(rgb, os.path.join(tmp, images, name))
                save_palette_png(mask, PALETTES[dataset], os.path.join(tmp, masks, name))
                present += label.astype(int)
            summary[split] = present
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return summary


def save_figure(path, seed=0, size=224, per_dataset=5):
    """Patches of both datasets with their masks in the dataset palette, and a legend."""
    gap, font = 6, ImageFont.load_default(size=14)
    width = per_dataset * (size + gap) + gap
    rows = []
    for dataset in DATASETS:
        bank = stamp_bank(seed, dataset)
        patches = []
        index = 0
        shown = BACKGROUND + (BACKGROUND_RATE[dataset] > 0)  # classes worth showing
        while len(patches) < per_dataset:  # mixed patches, the j-th showing class j % shown
            rgb, mask = make_patch(patch_rng(seed, dataset, 'val', index), bank, size, dataset)
            index += 1
            present = np.bincount(mask.ravel(), minlength=BACKGROUND + 1) > 0
            if present.sum() >= 2 and present[len(patches) % shown]:
                patches.append((rgb, mask))
        palette = np.array(PALETTES[dataset], np.uint8).reshape(-1, 3)
        legend = Image.new('RGB', (width, 28), 'white')
        draw = ImageDraw.Draw(legend)
        draw.text((gap, 6), f'{dataset}:', fill='black', font=font)
        for c, name in enumerate(CLASS_NAMES[dataset] + ('background',)):
            x = gap + 60 + c * 130
            draw.rectangle((x, 6, x + 16, 22), fill=tuple(int(v) for v in palette[c]), outline='black')
            draw.text((x + 22, 6), name, fill='black', font=font)
        rows.append(np.asarray(legend))
        for layer in (lambda rgb, mask: rgb, lambda rgb, mask: palette[mask]):
            row = np.full((size + gap, width, 3), 255, np.uint8)
            for i, (rgb, mask) in enumerate(patches):
                x = gap + i * (size + gap)
                row[:size, x:x + size] = layer(rgb, mask)
            rows.append(row)
    save_png(np.concatenate(rows), path)


def main(args):
    if args.out is None and args.figure is None:
        raise InputError('--out: give --out DIR (a dataset) and/or --figure PATH')
    for flag in ('train', 'val', 'test'):
        if getattr(args, flag) < 1:
            raise InputError(f'--{flag} {getattr(args, flag)}: need at least one patch')
    if args.seed < 0:
        raise InputError(f'--seed {args.seed}: must be 0 or more')
    if args.size < 32:
        raise InputError(f'--size {args.size}: patches must be at least 32 pixels')
    if args.figure is not None:
        save_figure(args.figure, args.seed, args.size)
        print(f'wrote {args.figure}')
    if args.out is not None:
        counts = {split: getattr(args, split) for split in SPLITS}
        start = time.perf_counter()
        summary = write_dataset(args.out, args.dataset, args.size, counts, args.seed)
        seconds = time.perf_counter() - start
        total = sum(counts.values())
        print(f'wrote {total} patches ({args.size} px) to {args.out} in {seconds:.1f} s '
              f'({60 * total / seconds:.0f} patches/min)')
        for split, present in summary.items():
            shares = ', '.join(f'{n} {c}' for n, c in zip(CLASS_NAMES[args.dataset], present))
            print(f'  {split}: {counts[split]} patches; patches containing each class: {shares}')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', help='dataset folder to create (must not exist or be empty)')
    parser.add_argument('--dataset', choices=DATASETS, default='luad',
                        help='naming style, class order and palette (luad also has white background)')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--train', type=int, default=400)
    parser.add_argument('--val', type=int, default=60)
    parser.add_argument('--test', type=int, default=60)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--figure', help='also write an example figure (both datasets) to this PNG')
    parser.add_argument('--debug', action='store_true', help='show tracebacks of input errors')
    return parser.parse_args(argv)


if __name__ == '__main__':
    run_cli(main, parse_args())
