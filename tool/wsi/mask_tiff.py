"""A label mask as a tiled, pyramidal TIFF that OpenSlide, QuPath and napari open at its scale.

The layout of a generic pyramidal TIFF, which OpenSlide (and QuPath through it) reads: the mask
at full resolution in the first page, then reduced-resolution pages (NewSubfileType 1), each
half the size of the one before, until one fits in a tile. Every page is tiled (TILE x TILE),
deflate-compressed (class masks shrink a hundredfold), 8-bit palette colour with the dataset's
palette (viewers show class colours; tifffile and napari read the class indices), and, when the
resolution is known, carries it in the resolution tags (pixels per centimetre). Reduced pages
take each block's centre pixel: a label is copied, never averaged.

Pages are written tile by tile from a LabelRaster, so memory holds one row of tiles.

    write_mask_tiff('slide-mask.tiff', raster, DATASETS['luad'].palette, mpp=1.0)
"""
import math

import numpy as np
import tifffile

from tool.core.files import atomic_write
from tool.wsi.label_raster import centre_indices

TILE = 256
BIGTIFF_PIXELS = 2 ** 31  # classic TIFF offsets stop at 4 GB: larger masks get BigTIFF (OpenSlide reads both)


def pyramid_sizes(height, width, tile=TILE):
    """[(height, width)] of every page: full size, then halved (rounded up) until one fits in a tile."""
    sizes = [(height, width)]
    while sizes[-1][0] > tile or sizes[-1][1] > tile:
        sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
    return sizes


def page_tiles(raster, height, width, tile):
    """The tiles of one page, row by row: the raster itself, or its block centres when reduced."""
    reduced = (height, width) != (raster.height, raster.width)
    rows = centre_indices(height, raster.height)
    columns = centre_indices(width, raster.width)
    for y in range(0, height, tile):
        if reduced:
            strip = raster.sampled_rows(rows[y:y + tile], columns)
        else:
            strip = raster.rows(y, tile)
        for x in range(0, width, tile):
            yield strip[:, x:x + tile]  # tifffile pads the border tiles


def write_mask_tiff(path, raster, palette, mpp=None, tile=TILE):
    """The LabelRaster's mask as a pyramidal TIFF at `path` (atomically). mpp: um per pixel of the
    mask, written as its resolution; None leaves the tags out."""
    colours = np.asarray(palette, np.uint16).reshape(-1, 3)
    colormap = np.zeros((3, 256), np.uint16)
    colormap[:, :len(colours)] = colours.T * 257  # TIFF colour maps are 16-bit
    with atomic_write(path) as tmp, \
            tifffile.TiffWriter(tmp, bigtiff=raster.height * raster.width >= BIGTIFF_PIXELS) as tiff:
        for page, (height, width) in enumerate(pyramid_sizes(raster.height, raster.width, tile)):
            resolution = {}
            if mpp:
                page_mpp = (mpp * raster.width / width, mpp * raster.height / height)
                resolution = dict(resolution=(1e4 / page_mpp[0], 1e4 / page_mpp[1]), resolutionunit='CENTIMETER')
            tiff.write(page_tiles(raster, height, width, tile), shape=(height, width), dtype=np.uint8,
                       tile=(tile, tile), photometric='palette', colormap=colormap, compression='zlib',
                       subfiletype=1 if page else 0, metadata=None, **resolution)
