"""Input images of any size, read as strips of RGB rows.

    with open_image(path, level) as image:      # .height, .width
        rows = image.read(y, 224)               # uint8 (224, width, 3)

- PNG / JPEG (PIL) and flat TIFF (tifffile) are decoded whole: these formats cannot be read by
  region. The uint8 image is the only full-size array inference then keeps besides its outputs.
- Whole-slide images (.svs, .ndpi, .mrxs, ... and pyramidal TIFF) go through OpenSlide at one
  pyramid level, region by region, so a slide is never held in memory. OpenSlide is an optional
  extra: `pip install -r requirements-wsi.txt`.
"""
import contextlib
import os

import numpy as np
import tifffile
from PIL import Image

from tool.data import image_size as png_size, read_rgb
from tool.io import InputError

PLAIN_EXTENSIONS = ('.png', '.jpg', '.jpeg')
TIFF_EXTENSIONS = ('.tif', '.tiff')
SLIDE_EXTENSIONS = ('.svs', '.ndpi', '.mrxs', '.scn', '.svslide', '.bif', '.vms', '.vmu')
EXTENSIONS = PLAIN_EXTENSIONS + TIFF_EXTENSIONS + SLIDE_EXTENSIONS
INSTALL_HINT = 'pip install -r requirements-wsi.txt'


@contextlib.contextmanager
def large_images_allowed():
    """Lift PIL's decompression-bomb limit (89 M pixels warns, 179 M refuses) while reading.

    That limit protects services that open images from strangers: a few KB of PNG can claim
    gigapixels. Here the user hands us their own scans to segment, and a 10000 x 10000 region is
    ordinary; the memory it takes (3 bytes a pixel) is what they asked for."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


class RowSource:
    """height, width, read(y, rows) -> uint8 (rows, width, 3); a context manager that closes."""

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PixelArray(RowSource):
    """An image held in memory as uint8 (H, W, 3)."""

    def __init__(self, pixels):
        self.pixels = pixels
        self.height, self.width = pixels.shape[:2]

    def read(self, y, rows):
        return self.pixels[y:y + rows]


class Slide(RowSource):
    """One pyramid level of a whole-slide image; rows are read from disk on request."""

    def __init__(self, path, level):
        openslide = import_openslide(path)
        try:
            self.slide = openslide.OpenSlide(path)
        except (openslide.OpenSlideError, OSError) as e:
            raise InputError(f'{path}: OpenSlide cannot read it ({e})') from None
        levels = self.slide.level_count
        if not 0 <= level < levels:
            self.slide.close()
            raise InputError(f'{path}: --level {level} does not exist, the slide has levels 0..{levels - 1}')
        self.path, self.level = path, level
        self.width, self.height = self.slide.level_dimensions[level]
        self.downsample = self.slide.level_downsamples[level]

    def read(self, y, rows):
        rows = min(rows, self.height - y)
        # OpenSlide takes the top-left corner in level-0 coordinates, the size in level pixels.
        region = self.slide.read_region((0, round(y * self.downsample)), self.level, (self.width, rows))
        return over_white(np.asarray(region))

    def close(self):
        self.slide.close()


def over_white(rgba):
    """RGB of an RGBA region composited over white: OpenSlide returns areas outside the scanned
    tissue as transparent black, which would otherwise read as dark tissue."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    alpha = alpha.astype(np.uint16)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def import_openslide(path):
    try:
        import openslide
    except (ImportError, OSError):  # OSError: the Python package is there, the library is not
        raise InputError(f'{path}: reading whole-slide images needs OpenSlide: {INSTALL_HINT}') from None
    return openslide


def is_slide(path):
    """Whole-slide formats, and TIFF files that hold a resolution pyramid."""
    extension = os.path.splitext(path)[1].lower()
    if extension in SLIDE_EXTENSIONS:
        return True
    if extension in TIFF_EXTENSIONS:
        with open_tiff(path) as tiff:
            return len(tiff.series[0].levels) > 1
    return False


def open_tiff(path):
    try:
        tiff = tifffile.TiffFile(path)
    except FileNotFoundError:
        raise InputError(f'{path}: file not found') from None
    except (tifffile.TiffFileError, OSError, ValueError) as e:
        raise InputError(f'{path}: not a readable TIFF ({e})') from None
    if not tiff.series:
        tiff.close()
        raise InputError(f'{path}: the TIFF holds no image')
    return tiff


def image_size(path, level=0):
    """(height, width) of the image at `level`, from the file header only."""
    if is_slide(path):
        with Slide(path, level) as slide:
            return slide.height, slide.width
    check_single_level(path, level)
    if path.lower().endswith(TIFF_EXTENSIONS):
        with open_tiff(path) as tiff:
            series = tiff.series[0]
            return series.shape[series.axes.index('Y')], series.shape[series.axes.index('X')]
    with large_images_allowed():
        width, height = png_size(path)
    return height, width


def open_image(path, level=0):
    """A PixelArray (decoded now) or a Slide (read on request) of `path` at pyramid level `level`."""
    if is_slide(path):
        return Slide(path, level)
    check_single_level(path, level)
    if path.lower().endswith(TIFF_EXTENSIONS):
        return PixelArray(read_tiff_rgb(path))
    with large_images_allowed():
        return PixelArray(read_rgb(path))


def check_single_level(path, level):
    if level != 0:
        raise InputError(f'{path}: --level {level} does not exist, a plain image has only level 0 '
                         f'(pyramid levels exist in whole-slide files and pyramidal TIFF)')


def read_tiff_rgb(path):
    """uint8 (H, W, 3) of a flat TIFF: gray is expanded, alpha dropped, 16 bits scaled to 8."""
    with open_tiff(path) as tiff:
        series = tiff.series[0]
        try:
            pixels = series.asarray()
        except Exception as e:  # tifffile raises many types for broken or unsupported files
            raise InputError(f'{path}: cannot decode the TIFF ({type(e).__name__}: {e})') from None
        if series.axes in ('SYX', 'CYX'):  # planar configuration: colour planes first
            pixels = np.moveaxis(pixels, 0, -1)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise InputError(f'{path}: expected one RGB or gray image, the TIFF holds an array of shape {pixels.shape}')
    if pixels.dtype == np.uint16:
        pixels = np.round(pixels[:, :, :3] / 257).astype(np.uint8)
    if pixels.dtype != np.uint8:
        raise InputError(f'{path}: {pixels.dtype} pixels are not supported (8- or 16-bit images only)')
    return np.ascontiguousarray(pixels[:, :, :3])
