"""Input images of any size, read as strips of RGB rows.

    with open_image(path) as image:             # .height, .width
        rows = image.read(y, 224)               # uint8 (224, width, 3)

PNG / JPEG (PIL) and flat TIFF (tifffile) are decoded whole: these formats cannot be read by
region. The uint8 image is the only full-size array inference then keeps besides its outputs.
Whole-slide images (.svs, .ndpi, .mrxs, ... and pyramidal TIFF, `is_slide`) are read region by
region at any resolution by tool/wsi/slide_reader.py.
"""
import contextlib
import os

import numpy as np
import tifffile
from PIL import Image

from tool.core.errors import InputError
from tool.data.patches import png_width_height, read_rgb

PLAIN_EXTENSIONS = ('.png', '.jpg', '.jpeg')
TIFF_EXTENSIONS = ('.tif', '.tiff')
SLIDE_EXTENSIONS = ('.svs', '.ndpi', '.mrxs', '.scn', '.svslide', '.bif', '.vms', '.vmu')
EXTENSIONS = PLAIN_EXTENSIONS + TIFF_EXTENSIONS + SLIDE_EXTENSIONS


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


def reflect_pad(rgb, height, width):
    """uint8 (>= height, >= width, 3): `rgb` mirrored past its bottom and right edges up to that
    size (numpy's 'reflect', repeated for an image less than half as large)."""
    return np.pad(rgb, ((0, max(0, height - rgb.shape[0])), (0, max(0, width - rgb.shape[1])), (0, 0)),
                  mode='reflect')


class ReflectPadded(RowSource):
    """`image` (a RowSource) extended by reflection to at least `size` x `size`: a network then sees
    inputs of the size it learnt on even where the image is smaller. Rows and columns beyond the
    image are its mirror; crop them off the result."""

    def __init__(self, image, size):
        self.image = image
        self.height, self.width = max(image.height, size), max(image.width, size)

    def read(self, y, rows):
        if self.image.height < self.height:  # less than a tile tall: the whole image is one strip
            return reflect_pad(self.image.read(0, self.image.height), self.height, self.width)[y:y + rows]
        return reflect_pad(self.image.read(y, rows), 0, self.width)


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


def image_height_width(path, level=None):
    """(height, width) of a plain image, from the file header only."""
    check_single_level(path, level)
    if path.lower().endswith(TIFF_EXTENSIONS):
        with open_tiff(path) as tiff:
            series = tiff.series[0]
            return series.shape[series.axes.index('Y')], series.shape[series.axes.index('X')]
    with large_images_allowed():
        width, height = png_width_height(path)
    return height, width


def open_image(path, level=None):
    """A PixelArray of a plain image (PNG, JPEG, flat TIFF), decoded now."""
    check_single_level(path, level)
    if path.lower().endswith(TIFF_EXTENSIONS):
        return PixelArray(read_tiff_rgb(path))
    with large_images_allowed():
        return PixelArray(read_rgb(path))


def check_single_level(path, level):
    if level not in (None, 0):
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
