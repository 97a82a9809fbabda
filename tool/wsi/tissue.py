"""Tissue detection: where on a slide the tissue is, from a low-resolution thumbnail.

Tissue is whatever differs from the slide's own glass. Otsu's split of the saturation (CLAM,
WSInfer) fails on slides of glass, pale tissue (necrosis, oedema, mucin, faint stains) and dense
tissue: it splits pale from dense and calls the pale tissue glass. Instead, as HistoQC thresholds
brightness and colour, but against the glass measured on each slide:
1. the thumbnail is median-filtered 3 x 3 against dust and noise;
2. the glass's colour: the median of the unsaturated pixels within GLASS_WINDOW of the brightest
   ones (their 99th percentile), leaving out pure white (outside the scan: always background);
3. tissue where the colour, white-balanced to the glass, has a chroma (HSV saturation) above
   MIN_CHROMA or a darkness (the fraction of the glass's light it takes) above MIN_DARKNESS, or
   above the glass's own median plus NOISE_SIGMAS of its pixel noise where that is more (noisy
   glass), and at least EDGE of the highest beside it (the edge where a blend is half tissue);
   with --tissue_saturation, where the plain saturation exceeds that instead;
4. a morphological closing with a disk of `closing_um` joins tissue that staining left ragged;
5. holes smaller than `min_area_um2` are filled, specks smaller than it removed.
Neutral dark marks (ink, dirt, a coverslip's edge) larger than that count as tissue too.

    mask = detect_tissue(thumbnail, pixel_um=TISSUE_MPP)                # bool (h, w)
    tissue = TissueMap(mask, thumbnail_per_grid_pixel, (height, width))  # on the segmentation grid
    tissue.rows(y, 224, x, 224).any()                                    # does a tile hold tissue?
"""
import cv2
import numpy as np

from tool.method.pseudo_mask import without_small_regions

TISSUE_MPP = 8.0  # um per thumbnail pixel: a 25 x 20 mm slide gives a 3125 x 2500 thumbnail
# Chroma and darkness at 8 um per pixel: glass 0.00..0.02 (the 99th percentiles on an Aperio H&E
# slide, tests/fixtures/cmu_small_region.svs), its stained tissue 0.18..0.48 and 0.26..0.68 (5th
# to 95th percentiles); pale necrosis or stroma, (235, 215, 225) on glass (240, 237, 244), 0.074
# and 0.064; a faint haematoxylin, (226, 221, 233), 0.023 and 0.057.
MIN_CHROMA = 0.04
MIN_DARKNESS = 0.04
EDGE = 0.5  # and at least this fraction of the highest contrast in its 3 x 3 neighbourhood
NOISE_SIGMAS = 4.0
GLASS_SATURATION = 25  # glass candidates: HSV saturation (0..255) at most this; tinted glass measures < 15
GLASS_WINDOW = 0.05  # glass candidates: within 5 % of the brightest ones' brightness
CLOSING_UM = 16.0
MIN_AREA_UM2 = 10_000.0  # 0.01 mm2: a 100 x 100 um fragment is kept


def saturation(rgb):
    """uint8 (h, w): HSV saturation of uint8 RGB, 255 (max - min) / max rounded (0 for black)."""
    # Not cv2's RGB2HSV: its fixed-point reciprocal is 1 off in 0.74 % of the 2^24 colours (measured).
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return _SATURATION[np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)]


_HIGH, _LOW = np.mgrid[:256, :256]
_SATURATION = ((255 * (_HIGH - _LOW) + _HIGH // 2) // np.maximum(_HIGH, 1)).clip(0).astype(np.uint8)  # [max, min]


def glass_colour(rgb):
    """float32 (3,), bool (h, w): the glass's RGB in a (median-filtered) uint8 thumbnail and the
    pixels it was measured on; white (255, 255, 255) where nothing looks like glass."""
    brightness = rgb[..., 0].astype(np.uint16) + rgb[..., 1] + rgb[..., 2]  # 3 x the mean of R, G, B
    candidates = (saturation(rgb) <= GLASS_SATURATION) & (brightness < 3 * 255)
    if not candidates.any():
        return np.full(3, 255.0, np.float32), candidates
    brightest = np.percentile(brightness[candidates], 99)
    glass = candidates & (brightness >= brightest * (1 - GLASS_WINDOW))
    return np.median(rgb[glass], 0).astype(np.float32), glass


def glass_contrast(rgb, glass):
    """float32 (h, w) twice: chroma and darkness of uint8 RGB against the glass's RGB, both 0 on
    glass: the HSV saturation of the colour divided by the glass's channel by channel (white-
    balanced), and 1 - the mean of R, G, B over the glass's (the fraction of its light it takes)."""
    r, g, b = (np.arange(256, dtype=np.float32)[rgb[..., c]] / max(float(glass[c]), 1.0) for c in range(3))
    high = np.maximum(np.maximum(r, g), b)
    chroma = (high - np.minimum(np.minimum(r, g), b)) / np.maximum(high, 1e-6)
    return chroma, 1 - (r + g + b) / 3


def pixel_noise(values, where, step=3):
    """The standard deviation of `values`' pixel noise over `where`: from differences of pixels
    `step` apart along the rows (beyond the median filter's reach; shading cancels), robust (MAD)."""
    pairs = where[:, step:] & where[:, :-step]
    if not pairs.any():
        return 0.0
    differences = (values[:, step:] - values[:, :-step])[pairs]
    return float(1.4826 * np.median(np.abs(differences - np.median(differences))) / np.sqrt(2))


def tissue_pixels(rgb, threshold=None):
    """bool (h, w): the pixels of uint8 RGB that differ from its glass (steps 1-3 of the module's
    docstring); threshold: a fixed saturation threshold (0..255) instead."""
    if threshold is not None:
        return cv2.medianBlur(saturation(rgb), 3) > threshold
    rgb = cv2.medianBlur(np.ascontiguousarray(rgb), 3)
    glass, measured = glass_colour(rgb)
    tissue = np.zeros(rgb.shape[:2], bool)
    for contrast, floor in zip(glass_contrast(rgb, glass), (MIN_CHROMA, MIN_DARKNESS)):
        on_glass = float(np.median(contrast[measured])) if measured.any() else 0.0
        above = contrast > max(floor, on_glass + NOISE_SIGMAS * pixel_noise(contrast, measured))
        # the thumbnail's resampling blurs stain into the glass beside it: the edge at half of it
        tissue |= above & (contrast >= EDGE * cv2.dilate(contrast, np.ones((3, 3), np.uint8)))
    return tissue & (cv2.inRange(rgb, (255, 255, 255), (255, 255, 255)) == 0)  # white: outside the scan


def detect_tissue(rgb, pixel_um, threshold=None, closing_um=CLOSING_UM, min_area_um2=MIN_AREA_UM2):
    """bool (h, w): tissue in a uint8 RGB thumbnail of `pixel_um` um per pixel. threshold: a fixed
    saturation threshold (0..255, --tissue_saturation) instead of the glass's contrast."""
    tissue = tissue_pixels(rgb, threshold).astype(np.uint8)
    radius = round(closing_um / pixel_um)
    if radius > 0:
        # A Euclidean disk: cv2's MORPH_ELLIPSE differs from it (4 to 24 pixels at radii 2 to 11).
        disk = (np.hypot(*np.mgrid[-radius:radius + 1, -radius:radius + 1]) <= radius).astype(np.uint8)
        # Padded so that tissue at the thumbnail's border closes as it does inside.
        tissue = cv2.morphologyEx(np.pad(tissue, radius), cv2.MORPH_CLOSE, disk)[radius:-radius, radius:-radius]
    min_pixels = min_area_um2 / pixel_um ** 2
    tissue = ~without_small_regions(tissue == 0, min_pixels, keep_border=True)  # holes
    return without_small_regions(tissue, min_pixels)  # specks


class TissueMap:
    """A thumbnail's tissue mask seen on the segmentation grid: grid pixel (y, x) takes the
    thumbnail pixel its centre falls in, floor((y + 0.5) * scale), scale = thumbnail pixels per
    grid pixel. Every use (tiles skipped, glass set to background, the tissue's box) goes through
    this one mapping, so they agree."""

    def __init__(self, mask, scale, grid_size):
        self.mask, self.scale = mask, scale
        self.height, self.width = grid_size

    @classmethod
    def everywhere(cls, grid_size):
        """All tissue: tissue detection turned off."""
        return cls(np.ones((1, 1), bool), 0.0, grid_size)

    def _thumbnail_index(self, start, count, size):
        return np.minimum(((np.arange(start, start + count) + 0.5) * self.scale).astype(np.int64), size - 1)

    def rows(self, y, rows, x=0, width=None):
        """bool (rows, width): tissue on the grid from pixel (x, y)."""
        width = self.width - x if width is None else width
        return self.mask[np.ix_(self._thumbnail_index(y, rows, self.mask.shape[0]),
                                self._thumbnail_index(x, width, self.mask.shape[1]))]

    def box(self):
        """(x, y, width, height): the smallest grid box that holds all tissue, or None."""
        row_index = self._thumbnail_index(0, self.height, self.mask.shape[0])
        column_index = self._thumbnail_index(0, self.width, self.mask.shape[1])
        seen = self.mask[np.ix_(np.unique(row_index), np.unique(column_index))]  # the pixels the grid samples
        rows = seen.any(1)[np.searchsorted(np.unique(row_index), row_index)]
        columns = seen.any(0)[np.searchsorted(np.unique(column_index), column_index)]
        if not rows.any():
            return None
        (y0, y1), (x0, x1) = [np.flatnonzero(line)[[0, -1]] for line in (rows, columns)]
        return int(x0), int(y0), int(x1 - x0 + 1), int(y1 - y0 + 1)
