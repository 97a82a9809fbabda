"""Synthetic H&E-like tissue patches with exact masks, in the layout of the released datasets.

    python -m tool.data.synth --out datasets/SYNTH-LUAD --dataset luad
    python -m tool.data.synth --out datasets/SYNTH-BCSS --dataset bcss
    python -m tool.data.synth --figure docs/synth_examples.png

writes train/ (patch label in the file name, in the dataset's style), train_gt/ (the pixel
truth of the train patches, which real datasets do not have), val/img, val/mask, test/img,
test/mask. Masks are palette PNGs; 4 is white background (luad only).

How a patch is made. The truth first, at tissue scale: a few tissue types get smooth random
fields with features a few tens of pixels across (the variant's region_scale), and each pixel
takes the largest (borders that wander by a few cells); connected pieces smaller than MIN_PIECE
of the patch are merged into what surrounds them, and types covering less than min_fraction are
dropped, so that the patch label (types present in the mask) names only visible tissue. Then the
image, with a border exactly where the truth has one: each type fills its whole region with
haematoxylin (H) and eosin (E) concentration maps of its own texture, its nuclei clipped to the
region:
    tumour       sheets of crowded, large vesicular nuclei on purple-pink cytoplasm
    necrosis     pale granular eosinophilic debris with clumps of small nuclear fragments
    lymphocytes  densely packed small, round, very dark nuclei
    stroma       wavy oriented pink fibres with sparse spindle-shaped nuclei
Pixel scales (nuclei, fibres, compartments) do not depend on the patch size, as at a fixed
magnification. The concentrations become RGB through Beer-Lambert with per-patch stain vectors
and strengths (stain variation), so tumour and lymphocytes are both purple and necrosis and
stroma both pink: a classifier needs texture, not only mean colour.

Every patch has its own RNG seeded by (seed, dataset, split, index): the same seed gives the
same bytes, and a longer run extends a shorter one.
"""
import argparse
import functools
import os
import shutil
import time
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from tool.core.errors import InputError, run_cli
from tool.core.files import cannot_write, save_palette_png, save_png
from tool.core.log import log
from tool.data.datasets import BACKGROUND, DATASETS, TISSUES
from tool.data.patches import label_from_mask

GENERATED = ('luad', 'bcss')  # the datasets this generator imitates
SPLITS = ('train', 'val', 'test')
MIN_PIECE = 0.015          # connected pieces smaller than this share of the patch are merged away
MAX_BACKGROUND = 0.45      # keep most of a patch tissue, as in the real crops
BACKGROUND_RATE = {'luad': 0.4, 'bcss': 0.0}


class Variant(NamedTuple):
    """The generator's settings that shape what a recipe sees."""
    min_fraction: float        # a tissue type covering less of the patch is removed from it
    region_scale: tuple        # pixels across a tissue compartment (drawn per patch)
    border_roughness: float    # borders wander by a few cells, never into specks
    stain_strength: tuple      # per-patch scale of each stain's optical density
    tissues_per_patch: tuple   # P(1, 2, 3, 4 types drawn before pruning)
    stain_h: tuple             # optical density per unit concentration (R, G, B)
    stain_e: tuple


# 'default' is the demo's data. 'heldout' changes every setting above (smaller compartments,
# rougher borders, stronger stain variation, Ruifrok & Johnston's stain vectors, more mixed
# patches): data that the demo's recipe was never tuned on, to check a recipe on.
VARIANTS = {
    'default': Variant(0.06, (40, 70), 0.15, (0.85, 1.25), (0.3, 0.4, 0.22, 0.08),
                       (0.5626, 0.7201, 0.4062), (0.2159, 0.8012, 0.5581)),
    'heldout': Variant(0.05, (28, 50), 0.25, (0.75, 1.4), (0.2, 0.35, 0.3, 0.15),
                       (0.65, 0.70, 0.29), (0.07, 0.99, 0.11)),
}
STAMP_VARIANTS = 48
CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))  # a piece's 4-connected neighbours
MARGIN = 16                # canvas padding so a nucleus stamp never needs clipping


# ---- smooth random fields ----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def upsampling_weights(size, grid):
    """Bilinear upsampling from `grid` to `size` samples: left neighbour index and its weight."""
    x = np.clip((np.arange(size) + 0.5) * grid / size - 0.5, 0, grid - 1)
    low = np.minimum(np.floor(x).astype(int), grid - 2)
    return low, (x - low).astype(np.float32)


def smooth_noise(rng, size, scale):
    """Zero-mean noise with features about `scale` pixels wide (whatever the patch size): a
    normal sample on a grid of that spacing, upsampled bilinearly. Element-wise, not a matrix
    product: no BLAS threads, whose summation order could change the bytes between machines."""
    grid = max(2, int(round(size / scale)) + 1)
    low, w = upsampling_weights(size, grid)
    noise = rng.standard_normal((grid, grid), dtype=np.float32)
    rows = noise[low] * (1 - w)[:, None] + noise[low + 1] * w[:, None]
    return rows[:, low] * (1 - w) + rows[:, low + 1] * w


def region_field(rng, size, scale, roughness):
    """A field whose level sets are tissue compartments about `scale` pixels across: smooth
    noise blurred (no bilinear creases), normalised, plus a little finer noise so borders are
    irregular at the scale of a few cells."""
    # scipy's blur: cv2.GaussianBlur differs by up to 5e-7 (measured), which would change the bytes
    field = ndimage.gaussian_filter(smooth_noise(rng, size, scale), scale / 3, mode='nearest')
    field /= field.std() + 1e-6
    return field + roughness * smooth_noise(rng, size, 6)


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
                           for r in rng.uniform(2.6, 3.6, STAMP_VARIANTS)]
        self.fragment = [nucleus_stamp(rng, r, r * rng.uniform(0.5, 1), rng.uniform(0, np.pi), 0.3, 0.15)
                         for r in rng.uniform(0.8, 2.0, STAMP_VARIANTS)]
        # Spindle nuclei follow the fibres: one set per orientation bin.
        self.spindle_angles = np.linspace(0, np.pi, 12, endpoint=False)
        self.spindle = [[nucleus_stamp(rng, rng.uniform(6, 10), rng.uniform(1.3, 2.1), angle, 0.08, 0.1)
                         for _ in range(STAMP_VARIANTS // 4)] for angle in self.spindle_angles]

    @staticmethod
    def tumour_nucleus(rng):
        """Vesicular: a darker rim (chromatin on the membrane), paler centre, often a nucleolus."""
        a = rng.uniform(4.5, 7.5)
        stamp = nucleus_stamp(rng, a, a * rng.uniform(0.65, 1), rng.uniform(0, np.pi), 0.12, 0.25)
        r = stamp.shape[0] // 2
        y, x = np.mgrid[-r:r + 1, -r:r + 1]
        stamp *= 0.6 + 0.4 * np.clip(np.hypot(x, y) / a, 0, 1)
        if rng.random() < 0.7:
            cy, cx = rng.uniform(-a / 3, a / 3, 2)
            stamp += 0.6 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 1.2 ** 2)) * (stamp > 0.3)
        return stamp


def nuclei_layer(size):
    """An empty H layer for one tissue's nuclei, padded so a stamp never needs clipping."""
    return np.zeros((size + 2 * MARGIN, size + 2 * MARGIN), np.float32)


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


def packed_points(rng, where, spacing, jitter, keep_rate, size):
    """Cells packed like a jittered grid of `spacing` pixels: dense but rarely overlapping."""
    centres = np.arange(spacing / 2, size, spacing)
    ys, xs = np.meshgrid(centres, centres, indexing='ij')
    ys = np.clip(np.round(ys.ravel() + rng.uniform(-jitter, jitter, ys.size)), 0, size - 1).astype(int)
    xs = np.clip(np.round(xs.ravel() + rng.uniform(-jitter, jitter, xs.size)), 0, size - 1).astype(int)
    keep = where[ys, xs] & (rng.random(ys.size) < keep_rate)
    return ys[keep], xs[keep]


# ---- tissue textures: (H, E) concentration maps and a nuclei layer for one tissue type ----------
# Every painter fills its whole region with its own pattern (no empty stretches that would look
# like another tissue), at pixel scales that do not depend on the patch size.

def paint_tumour(rng, bank, size, region):
    """Sheets of large vesicular nuclei, crowded, on purple-pink cytoplasm."""
    h = 0.22 + 0.04 * smooth_noise(rng, size, 12)
    e = 0.42 + 0.06 * smooth_noise(rng, size, 12)
    nuclei = nuclei_layer(size)
    ys, xs = packed_points(rng, region, rng.uniform(12, 14.5), 3.5, 0.9, size)
    place(nuclei, [bank.tumour[k] for k in rng.integers(0, STAMP_VARIANTS, len(ys))], ys, xs,
          rng.uniform(0.8, 1.2, len(ys)))
    return h, e, nuclei


def paint_necrosis(rng, bank, size, region):
    """Granular pale-pink debris (~3 px grains) with clumps of small dark nuclear fragments."""
    granules = smooth_noise(rng, size, 3)
    h = 0.1 + 0.05 * np.abs(granules) + 0.04 * smooth_noise(rng, size, 10)
    e = 0.5 + 0.06 * smooth_noise(rng, size, 14) + 0.1 * granules
    # Karyorrhexis: each dead nucleus breaks into a small clump of dark fragments.
    cy, cx = sample_points(rng, region, 1 / 220, size)
    count = rng.integers(3, 7, len(cy))
    ys = np.clip(np.repeat(cy, count) + rng.integers(-4, 5, count.sum()), 0, size - 1)
    xs = np.clip(np.repeat(cx, count) + rng.integers(-4, 5, count.sum()), 0, size - 1)
    nuclei = nuclei_layer(size)
    place(nuclei, [bank.fragment[k] for k in rng.integers(0, STAMP_VARIANTS, len(ys))], ys, xs,
          rng.uniform(0.8, 1.3, len(ys)))
    return h, e, nuclei


def paint_lymphocytes(rng, bank, size, region):
    """Densely packed small, round, very dark nuclei with little cytoplasm."""
    h = 0.26 + 0.05 * smooth_noise(rng, size, 6)
    e = 0.3 + 0.05 * smooth_noise(rng, size, 6)
    ys, xs = packed_points(rng, region, rng.uniform(7, 8.5), 2.5, 0.9, size)
    nuclei = nuclei_layer(size)
    place(nuclei, [bank.lymphocyte[k] for k in rng.integers(0, STAMP_VARIANTS, len(ys))], ys, xs,
          rng.uniform(2.0, 2.6, len(ys)))
    return h, e, nuclei


def paint_stroma(rng, bank, size, region):
    """Wavy parallel pink collagen fibres with sparse spindle nuclei along them."""
    angle = rng.uniform(0, np.pi)
    yy, xx = pixel_grid(size)
    # Fibres: noise stretched ~30 px along `angle` and ~3.5 px across it gives broken parallel
    # streaks; a smooth displacement across the fibres makes them wavy.
    along = xx * np.cos(angle) + yy * np.sin(angle)
    across = -xx * np.sin(angle) + yy * np.cos(angle) + 5 * smooth_noise(rng, size, 50)
    streaks = lookup(rng.standard_normal((24, 256), dtype=np.float32), along / 30, across / 3.5)
    fibres = np.clip(0.45 + 0.55 * streaks, 0, 1)
    h = 0.05 + 0.03 * fibres
    e = 0.55 + 0.45 * fibres
    ys, xs = sample_points(rng, region, 1 / 500, size)
    turn = np.abs(bank.spindle_angles[:, None] - (angle + rng.normal(0, 0.15, len(ys))) % np.pi)
    bins = np.argmin(np.minimum(turn, np.pi - turn), axis=0)
    nuclei = nuclei_layer(size)
    place(nuclei, [bank.spindle[b][k] for b, k in zip(bins, rng.integers(0, STAMP_VARIANTS // 4, len(ys)))],
          ys, xs, rng.uniform(1.2, 1.7, len(ys)))
    return h, e, nuclei


PAINTERS = {'tumour': paint_tumour, 'necrosis': paint_necrosis, 'lymphocytes': paint_lymphocytes,
            'stroma': paint_stroma}


# ---- one patch ---------------------------------------------------------------------------------

def draw_regions(rng, size, dataset, variant):
    """Mask (size, size) uint8 of class indices (4 = background): compartments at tissue scale,
    no piece smaller than MIN_PIECE of the patch, every present class covering at least the
    variant's min_fraction, at least one tissue class, background at most MAX_BACKGROUND."""
    fields = {}
    scale = rng.uniform(*variant.region_scale)
    k = rng.choice(len(variant.tissues_per_patch), p=variant.tissues_per_patch) + 1
    for tissue in rng.choice(TISSUES, k, replace=False):
        fields[DATASETS[dataset].class_of(tissue)] = (region_field(rng, size, scale, variant.border_roughness)
                                                + rng.uniform(-0.5, 0.5))
    if rng.random() < BACKGROUND_RATE[dataset]:
        fields[BACKGROUND] = region_field(rng, size, scale, variant.border_roughness) - 0.6
    while True:
        mask = merge_small_pieces(largest_field(fields), int(MIN_PIECE * size * size))
        fraction = np.bincount(mask.ravel(), minlength=BACKGROUND + 1) / mask.size
        if fraction[BACKGROUND] > MAX_BACKGROUND:
            fields[BACKGROUND] -= 0.2
            continue
        # Drop the smallest tissue below the threshold; the largest always has >= 0.55 / 4.
        small = [c for c in fields if c != BACKGROUND and fraction[c] < variant.min_fraction]
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


def merge_small_pieces(mask, min_pixels):
    """Give every connected piece smaller than `min_pixels` (4-connectivity) to the class that
    surrounds it most, smallest piece first: real compartments are not specks."""
    while True:
        pieces = []
        for c in np.unique(mask):
            n, labels, stats, _ = cv2.connectedComponentsWithStats((mask == c).astype(np.uint8), connectivity=4)
            sizes = stats[:, cv2.CC_STAT_AREA]
            pieces += [(sizes[i], c, labels == i) for i in range(1, n) if sizes[i] < min_pixels]
        if not pieces or len(np.unique(mask)) == 1:
            return mask
        _, c, piece = min(pieces, key=lambda p: p[0])
        ring = cv2.dilate(piece.astype(np.uint8), CROSS).astype(bool) & ~piece
        mask[piece] = np.bincount(mask[ring], minlength=BACKGROUND + 1).argmax()


def blur3(x):
    """[1 2 1]/4 in both directions, edges repeated: the optics' slight softness."""
    p = np.pad(x, 1, mode='edge')
    x = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    return (x[:, :-2] + 2 * x[:, 1:-1] + x[:, 2:]) / 4


def render(rng, h, e, variant):
    """Beer-Lambert: RGB = 255 exp(-(h * H_stain + e * E_stain)), with this patch's stains."""
    stains = [np.array(s) + rng.normal(0, 0.05, 3) for s in (variant.stain_h, variant.stain_e)]
    stain_h, stain_e = [(s / np.linalg.norm(s)).astype(np.float32) for s in stains]
    od = (rng.uniform(*variant.stain_strength) * blur3(h)[:, :, None] * stain_h
          + rng.uniform(*variant.stain_strength) * blur3(e)[:, :, None] * stain_e + np.float32(0.02))
    rgb = 255 * np.exp(-od) + rng.uniform(-4, 4, od.shape).astype(np.float32)  # sensor noise
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def make_patch(rng, bank, size, dataset, variant=VARIANTS['default']):
    """(rgb uint8 (size, size, 3), mask uint8 (size, size))."""
    mask = draw_regions(rng, size, dataset, variant)
    h = np.zeros((size, size), np.float32)
    e = np.zeros((size, size), np.float32)
    for tissue in TISSUES:
        region = mask == DATASETS[dataset].class_of(tissue)
        if region.any():
            tissue_h, tissue_e, nuclei = PAINTERS[tissue](rng, bank, size, region)
            # Nuclei stop at their compartment's border, as the truth does.
            h[region] = np.maximum(tissue_h, nuclei[MARGIN:-MARGIN, MARGIN:-MARGIN])[region]
            e[region] = tissue_e[region]
    # Glass: nearly no stain.
    glass = mask == BACKGROUND
    h[glass], e[glass] = 0.01, 0.03 + 0.01 * rng.random(glass.sum(), dtype=np.float32)
    return render(rng, h, e, variant), mask


def patch_rng(seed, dataset, split, index):
    return np.random.default_rng([seed, GENERATED.index(dataset), SPLITS.index(split), index])


def stamp_bank(seed, dataset):
    return StampBank(np.random.default_rng([seed, GENERATED.index(dataset), len(SPLITS)]))


def patch_name(dataset, split, index, label):
    if dataset == 'luad':
        tag = f'-[{" ".join(str(int(v)) for v in label)}]' if split == 'train' else ''
        return f'synth{"" if split == "train" else "-" + split}-{index:06d}{tag}.png'
    tag = f'[{"".join(str(int(v)) for v in label)}]' if split == 'train' else ''
    return f'SYNTH{"" if split == "train" else "-" + split}_xmin0_ymin{index}+0{tag}.png'


# ---- dataset and figure -------------------------------------------------------------------------

def write_dataset(out, dataset, size, counts, seed, variant='default'):
    """Write every split into a temporary folder beside `out`, then rename it to `out`, so an
    interrupted run leaves no half dataset. Returns per-split class counts."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise InputError(f'{out}: exists and is not empty; remove it or choose another --out')
    out = os.path.abspath(out)
    tmp = os.path.join(os.path.dirname(out), f'.{os.path.basename(out)}.partial-{os.getpid()}')
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise cannot_write(out, e) from None
    try:
        bank = stamp_bank(seed, dataset)
        summary = {}
        for split in SPLITS:
            images, masks = (('train', 'train_gt') if split == 'train'
                             else (os.path.join(split, 'img'), os.path.join(split, 'mask')))
            present = np.zeros(BACKGROUND, int)
            for index in range(counts[split]):
                rgb, mask = make_patch(patch_rng(seed, dataset, split, index), bank, size, dataset,
                                       VARIANTS[variant])
                label = label_from_mask(mask)
                name = patch_name(dataset, split, index, label)
                save_png(rgb, os.path.join(tmp, images, name))
                save_palette_png(mask, DATASETS[dataset].palette, os.path.join(tmp, masks, name))
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
    for dataset in GENERATED:
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
        palette = np.array(DATASETS[dataset].palette, np.uint8).reshape(-1, 3)
        legend = Image.new('RGB', (width, 28), 'white')
        draw = ImageDraw.Draw(legend)
        draw.text((gap, 6), f'{dataset}:', fill='black', font=font)
        for c, name in enumerate(DATASETS[dataset].class_names + ('background',)):
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
        log.info(f'wrote {args.figure}')
    if args.out is not None:
        counts = {split: getattr(args, split) for split in SPLITS}
        start = time.perf_counter()
        summary = write_dataset(args.out, args.dataset, args.size, counts, args.seed, args.variant)
        seconds = time.perf_counter() - start
        total = sum(counts.values())
        log.info(f'wrote {total} patches ({args.size} px) to {args.out} in {seconds:.1f} s '
                 f'({60 * total / seconds:.0f} patches/min)')
        for split, present in summary.items():
            shares = ', '.join(f'{n} {c}' for n, c in zip(DATASETS[args.dataset].class_names, present))
            log.info(f'  {split}: {counts[split]} patches; patches containing each class: {shares}')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', help='dataset folder to create (must not exist or be empty)')
    parser.add_argument('--dataset', choices=GENERATED, default='luad',
                        help='naming style, class order and palette (luad also has white background)')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--train', type=int, default=400)
    parser.add_argument('--val', type=int, default=60)
    parser.add_argument('--test', type=int, default=60)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--variant', choices=tuple(VARIANTS), default='default',
                        help="generator settings; 'heldout': other compartment scale, borders, stains "
                             "and class mix, to check a recipe on data it was not tuned on")
    parser.add_argument('--figure', help='also write an example figure (both datasets) to this PNG')
    parser.add_argument('--debug', action='store_true', help='show tracebacks of input errors')
    return parser.parse_args(argv)


if __name__ == '__main__':
    run_cli(main, parse_args())
