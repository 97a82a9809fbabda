"""Whole-slide images read region by region at any resolution, through OpenSlide.

    slide = WholeSlide(path)                    # .width, .height (level 0), .mpp (or None)
    downsample, mpp = segmentation_grid(slide, mpp=1.0)
    view = SlideView(slide, downsample)         # .height, .width, .read(y, rows): a RowSource
    rgb = slide.read(downsample, x, y, width, height)

A grid of `downsample` has one pixel per `downsample` x `downsample` level-0 pixels: its pixel
(x, y) covers level-0 [x d, (x + 1) d) x [y d, (y + 1) d). A region of it is read from the
coarsest pyramid level at or finer than the grid and resampled to the grid (bicubic, as PIL's,
averaging over the source pixels when it reduces). Where the grid is a level's own (within
SAME_SCALE: scanners store downsamples like 4.000235), the level's pixels come as they are.
The filter's weights of a grid pixel depend only on its index, so a region equals the same rows
and columns of the whole level resampled at once, to the bit: tiles and strips have no seams.

The model's magnification: the datasets were cut at fixed resolutions (their `mpp` in tool/data/datasets.py), and
a network sees tissue at another resolution as other tissue. `segmentation_grid` turns --mpp (the resolution to
segment at), --slide_mpp (a level-0 resolution overriding the slide's metadata) and --level (a
pyramid level as it is) into the grid to read.
"""
import math

import numpy as np
from scipy import sparse

from tool.core.errors import InputError
from tool.inference.image_source import RowSource

SAME_SCALE = 1e-3  # relative difference between a grid and a level below which nothing is resampled
# --mpp may ask for up to 10 % finer than level 0: "40x" scanners give 0.23 to 0.26 um per pixel,
# and a model trained at 0.25 should run on all of them. Finer than that would invent detail.
MAX_UPSAMPLING = 1.1
BICUBIC_SUPPORT = 2  # source pixels each side that PIL's bicubic filter reaches, per output pixel
INSTALL_HINT = 'pip install -r requirements-wsi.txt'


def import_openslide(path):
    try:
        import openslide
    except (ImportError, OSError):  # OSError: the Python package is there, the library is not
        raise InputError(f'{path}: reading whole-slide images needs OpenSlide: {INSTALL_HINT}') from None
    return openslide


class WholeSlide:
    """An open slide: level-0 size, pyramid levels, resolution (um per level-0 pixel, or None when
    the metadata has none; OpenSlide derives it from the vendor's fields or the TIFF resolution
    tags), and regions at any downsample."""

    def __init__(self, path):
        self.openslide = import_openslide(path)
        try:
            self.slide = self.openslide.OpenSlide(path)
        except (self.openslide.OpenSlideError, OSError) as e:
            raise InputError(f'{path}: OpenSlide cannot read it ({e})') from None
        self.path = path
        self.width, self.height = self.slide.dimensions
        self.level_downsamples = self.slide.level_downsamples
        self.mpp = self._metadata_mpp()

    def _metadata_mpp(self):
        try:
            x, y = (float(self.slide.properties[f'openslide.mpp-{axis}']) for axis in 'xy')
        except (KeyError, ValueError):
            return None
        if not (x > 0 and y > 0):
            return None
        if abs(x - y) > 0.01 * max(x, y):
            self.close()
            raise InputError(f'{self.path}: pixels are not square ({x} x {y} um); this reader needs square pixels')
        return (x + y) / 2

    def level_for(self, downsample):
        """The coarsest pyramid level at or finer than `downsample`."""
        fine_enough = [level for level, d in enumerate(self.level_downsamples) if d <= downsample * (1 + SAME_SCALE)]
        return max(fine_enough, key=lambda level: self.level_downsamples[level]) if fine_enough else 0

    def grid_size(self, downsample):
        """(height, width) of the grid of `downsample` (partial border pixels left out)."""
        return max(1, math.floor(self.height / downsample)), max(1, math.floor(self.width / downsample))

    def read(self, downsample, x, y, width, height):
        """uint8 (height, width, 3) of the grid of `downsample`, top-left at grid pixel (x, y);
        outside the slide is white."""
        level = self.level_for(downsample)
        scale = downsample / self.level_downsamples[level]  # level pixels per grid pixel
        if abs(scale - 1) <= SAME_SCALE:
            return self._read_level(level, x, y, width, height)
        level_width, level_height = self.slide.level_dimensions[level]
        rows, row_weights = bicubic_taps(y, height, scale, level_height)
        columns, column_weights = bicubic_taps(x, width, scale, level_width)
        top, left = rows.min(), columns.min()
        source = self._read_level(level, left, top, columns.max() - left + 1, rows.max() - top + 1)
        out = resample(source, rows - top, row_weights, columns - left, column_weights)
        out[row_weights.sum(1) == 0] = 255  # beyond the slide
        out[:, column_weights.sum(1) == 0] = 255
        return out

    def _read_level(self, level, x, y, width, height):
        # OpenSlide takes the top-left corner in level-0 coordinates, the size in level pixels.
        d = self.level_downsamples[level]
        try:
            region = self.slide.read_region((round(x * d), round(y * d)), level, (width, height))
        except self.openslide.OpenSlideError as e:
            raise InputError(f'{self.path}: OpenSlide cannot read a region ({e}): a damaged or truncated '
                             'slide') from None
        return over_white(np.asarray(region))

    def close(self):
        self.slide.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def bicubic_taps(start, count, scale, source_size):
    """The bicubic filter (a = -0.5, as PIL's) from source pixels to grid pixels start .. start +
    count - 1: (source index, weight), each (count, taps). Reducing (scale > 1), the filter is
    stretched over `scale` source pixels, so it averages rather than skips. Taps outside the source
    get weight 0 and the others are renormalised (all 0 beyond the source). The weights of a grid
    pixel depend on its own index only: any region of the grid reads exactly what the whole grid
    would hold there."""
    stretch = max(scale, 1.0)
    centres = (np.arange(start, start + count) + 0.5) * scale  # in source pixel coordinates
    first = np.floor(centres - BICUBIC_SUPPORT * stretch).astype(np.int64)
    taps = first[:, None] + np.arange(math.ceil(2 * BICUBIC_SUPPORT * stretch) + 2)
    weights = cubic((taps + 0.5 - centres[:, None]) / stretch) * ((taps >= 0) & (taps < source_size))
    total = weights.sum(1, keepdims=True)
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    return np.clip(taps, 0, source_size - 1), weights.astype(np.float32)


def cubic(x, a=-0.5):
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((x - 5) * x + 8) * x * a - 4 * a, 0.0))


def resample(source, rows, row_weights, columns, column_weights):
    """uint8 grid pixels from uint8 source pixels: the taps as two sparse matrices, applied to the
    columns, then to the rows, in float32."""
    height, width = source.shape[:2]
    columns_first = source.transpose(1, 0, 2).reshape(width, -1).astype(np.float32)
    across = taps_matrix(columns, column_weights, width) @ columns_first
    across = across.reshape(len(columns), height, 3).transpose(1, 0, 2).reshape(height, -1)
    down = (taps_matrix(rows, row_weights, height) @ across).reshape(len(rows), len(columns), 3)
    return np.clip(np.rint(down), 0, 255).astype(np.uint8)


def taps_matrix(index, weights, source_size):
    """(grid pixels, source pixels) sparse matrix of the filter weights."""
    grid_pixels = np.repeat(np.arange(len(index)), index.shape[1])
    return sparse.csr_matrix((weights.ravel(), (grid_pixels, index.ravel())), shape=(len(index), source_size))


def over_white(rgba):
    """RGB of an RGBA region composited over white: OpenSlide returns areas outside the scanned
    tissue as transparent black, which would otherwise read as dark tissue."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    alpha = alpha.astype(np.uint16)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


class SlideView(RowSource):
    """A RowSource (height, width, read(y, rows)) of the box (x, y, width, height) of a slide's
    grid of `downsample` (the whole grid by default)."""

    def __init__(self, slide, downsample, box=None):
        self.slide, self.downsample = slide, downsample
        grid_height, grid_width = slide.grid_size(downsample)
        self.x, self.y, self.width, self.height = box or (0, 0, grid_width, grid_height)

    def read(self, y, rows):
        rows = min(rows, self.height - y)
        return self.slide.read(self.downsample, self.x, self.y + y, self.width, rows)

    def read_all(self, strip=128):
        """The whole view, read strip by strip (a slide without a coarse level is never read whole)."""
        return np.concatenate([self.read(y, strip) for y in range(0, self.height, strip)])


def segmentation_grid(slide, mpp, slide_mpp=None, level=None):
    """(downsample, um per grid pixel or None) of the grid to segment on.

    level: that pyramid level as it is (its resolution is unknown when the slide has none);
    otherwise `mpp` um per pixel, from the slide's level-0 resolution (`slide_mpp` or its metadata),
    which must then exist and be at most MAX_UPSAMPLING coarser than `mpp`."""
    level0_mpp = slide_mpp or slide.mpp
    if level is not None:
        if not 0 <= level < len(slide.level_downsamples):
            raise InputError(f'{slide.path}: --level {level} does not exist, the slide has levels '
                             f'0..{len(slide.level_downsamples) - 1}')
        downsample = slide.level_downsamples[level]
        return downsample, level0_mpp * downsample if level0_mpp else None
    if level0_mpp is None:
        raise InputError(f'{slide.path}: no resolution in the slide\'s metadata (openslide.mpp-x); give '
                         f'--slide_mpp (um per level-0 pixel) or --level (a pyramid level, segmented as it is)')
    if mpp * MAX_UPSAMPLING < level0_mpp:
        raise InputError(f'{slide.path}: --mpp {mpp:g} is finer than the slide\'s finest level '
                         f'({level0_mpp:.4g} um per pixel)')
    return mpp / level0_mpp, mpp
