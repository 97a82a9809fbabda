"""Tissue detection: where on a slide the tissue is, from a low-resolution thumbnail.

The usual recipe (CLAM, WSInfer): stained tissue is coloured, glass is white or grey, so
1. saturation S = (max - min) / max of R, G, B (HSV's S, 0..255), median-filtered 3 x 3 against
   dust and noise;
2. tissue where S exceeds Otsu's threshold of the thumbnail (or --tissue_saturation), but never
   below MIN_SATURATION: on a slide of glass only, Otsu would split the glass's noise in two;
3. a morphological closing with a disk of `closing_um` joins tissue that staining left ragged;
4. holes smaller than `min_area_um2` are filled, specks smaller than it removed.

    mask = detect_tissue(thumbnail, pixel_um=TISSUE_MPP)          # bool (h, w)
    tissue = TissueMap(mask, thumbnail_per_grid_pixel)             # on the segmentation grid
    tissue.rows(y, 224, x, 224).any()                              # does a tile hold tissue?
"""
import numpy as np
from scipy import ndimage

TISSUE_MPP = 8.0  # um per thumbnail pixel: a 25 x 20 mm slide gives a 3125 x 2500 thumbnail
MIN_SATURATION = 20  # glass and background measure 0..10, H&E-stained tissue 30..200 (0..255 scale)
CLOSING_UM = 16.0
MIN_AREA_UM2 = 10_000.0  # 0.01 mm2: a 100 x 100 um fragment is kept


def saturation(rgb):
    """uint8 (h, w): HSV saturation of uint8 RGB, 255 (max - min) / max (0 for black)."""
    high = rgb.max(2).astype(np.int32)
    low = rgb.min(2).astype(np.int32)
    return np.where(high > 0, (255 * (high - low) + high // 2) // np.maximum(high, 1), 0).astype(np.uint8)


def otsu_threshold(values):
    """The uint8 threshold t that best splits `values` into <= t and > t (Otsu: the largest
    between-class variance of the histogram)."""
    counts = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256)
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * levels)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    return int(np.argmax(weight_low * weight_high * (mean_low - mean_high) ** 2))


def detect_tissue(rgb, pixel_um, threshold=None, closing_um=CLOSING_UM, min_area_um2=MIN_AREA_UM2):
    """bool (h, w): tissue in a uint8 RGB thumbnail of `pixel_um` um per pixel. threshold: a fixed
    saturation threshold (0..255) instead of Otsu's."""
    s = ndimage.median_filter(saturation(rgb), size=3)
    if threshold is None:
        threshold = max(otsu_threshold(s), MIN_SATURATION)
    tissue = s > threshold
    radius = round(closing_um / pixel_um)
    if radius > 0:
        disk = np.hypot(*np.mgrid[-radius:radius + 1, -radius:radius + 1]) <= radius
        # Padded so that tissue at the thumbnail's border closes as it does inside.
        tissue = ndimage.binary_closing(np.pad(tissue, radius), disk)[radius:-radius, radius:-radius]
    min_pixels = min_area_um2 / pixel_um ** 2
    tissue = ~without_small_regions(~tissue, min_pixels, keep_border=True)  # holes
    return without_small_regions(tissue, min_pixels)  # specks


def without_small_regions(mask, min_pixels, keep_border=False):
    """`mask` without its 4-connected regions of fewer than `min_pixels` pixels (with keep_border,
    regions that touch the border stay: the glass around the tissue is no hole)."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    small = np.bincount(labels.ravel(), minlength=count + 1) < min_pixels
    small[0] = False
    if keep_border:
        small[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = False
    return mask & ~small[labels]


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
