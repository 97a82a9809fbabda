"""A label mask too large to hold: uint8 rows in a raw file, written top to bottom, read back
row by row.

A slide's mask at the segmentation grid has as many pixels as the slide has at that resolution
(at 0.25 um per pixel that is level 0: billions). Inference writes it here strip by strip; the
outputs (the pyramidal TIFF, the GeoJSON, the overlay) then read the rows or the sampled grids
they need, so memory holds a strip, never the mask.

    raster = LabelRaster(path, height, width)
    raster.append(labels)                      # uint8 (rows, width), until height rows are in
    raster.rows(y, 256)                        # uint8 (256, width)
    raster.sampled(height // 4, width // 4)    # every 4th pixel: the centres of 4 x 4 blocks
"""
import os

import numpy as np


def centre_indices(count, size):
    """Indices of `count` samples spread evenly over `size`: the source pixel that holds the centre
    of each of `count` equal cells, floor((i + 0.5) size / count). For size = count * f these are
    the centres i f + f // 2 of f x f blocks."""
    return np.minimum((np.arange(count) * 2 + 1) * size // (2 * count), size - 1)


class LabelRaster:
    def __init__(self, path, height, width):
        self.path, self.height, self.width = path, height, width
        self.file = open(path, 'w+b')
        self.written = 0  # rows

    def append(self, labels):
        assert labels.dtype == np.uint8 and labels.shape[1] == self.width, labels.shape
        self.file.write(np.ascontiguousarray(labels).tobytes())
        self.written += labels.shape[0]

    def append_constant(self, value, rows, strip=1024):
        for y in range(0, rows, strip):
            self.append(np.full((min(strip, rows - y), self.width), value, np.uint8))

    def rows(self, y, rows):
        """uint8 (rows, width) from row y (fewer at the bottom)."""
        rows = min(rows, self.height - y)
        self.file.flush()
        return np.frombuffer(os.pread(self.file.fileno(), rows * self.width, y * self.width),
                             np.uint8).reshape(rows, self.width)

    def sampled_rows(self, row_indices, column_indices):
        """uint8 (len(row_indices), len(column_indices)): those rows and columns, one row read at a time."""
        out = np.empty((len(row_indices), len(column_indices)), np.uint8)
        for i, y in enumerate(row_indices):
            out[i] = self.rows(int(y), 1)[0, column_indices]
        return out

    def sampled(self, height, width):
        """The mask on a coarser grid of height x width: each cell's centre pixel (nearest
        neighbour, what a label mask needs: no averaging invents classes at region borders)."""
        return self.sampled_rows(centre_indices(height, self.height), centre_indices(width, self.width))

    def close(self):
        self.file.close()
