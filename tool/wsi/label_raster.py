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

A killed writer can go on where it stopped: Progress records, after each strip, how many rows are
safely on disk (the raster is fsynced first), the writer's state at that row and a
fingerprint of everything the rows depend on; a rerun with the same fingerprint reopens the
raster at those rows (LabelRaster(..., rows=R) cuts off anything written after them).

    progress = Progress(folder, fingerprint)
    raster = progress.open_raster(height, width)     # at progress.record['rows'], or new
    ...; raster.append(labels); progress.save(raster, counts=...)
    progress.wait()                                   # the last record on disk
    progress.finish()                                 # the record, then the raster, removed
"""
import json
import os
import threading

import numpy as np

from tool.core.files import atomic_write


def centre_indices(count, size):
    """Indices of `count` samples spread evenly over `size`: the source pixel that holds the centre
    of each of `count` equal cells, floor((i + 0.5) size / count). For size = count * f these are
    the centres i f + f // 2 of f x f blocks."""
    return np.minimum((np.arange(count) * 2 + 1) * size // (2 * count), size - 1)


class LabelRaster:
    def __init__(self, path, height, width, rows=0):
        """A new raster at `path`; rows > 0: the one there, its first `rows` rows kept, the rest cut off."""
        self.path, self.height, self.width = path, height, width
        if rows:
            self.file = open(path, 'r+b')
            if os.fstat(self.file.fileno()).st_size < rows * width:
                self.file.close()
                raise ValueError(f'{path}: holds fewer than {rows} rows')
            self.file.truncate(rows * width)
            self.file.seek(rows * width)
        else:
            self.file = open(path, 'w+b')
        self.written = rows

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


class Progress:
    """The progress record of the raster `folder`/RASTER: rows done and the writer's state at them,
    in `folder`/RECORD (JSON, written atomically), valid for one fingerprint. fingerprint None:
    nothing is recorded or resumed."""
    RASTER, RECORD = '.labels.raw', '.progress.json'

    def __init__(self, folder, fingerprint):
        self.raster_path = os.path.join(folder, self.RASTER)
        self.path = os.path.join(folder, self.RECORD)
        self.fingerprint = fingerprint
        self.record = self.load()
        self._writer = self._error = None

    def load(self):
        """The record a killed run left, if it has this fingerprint and its raster holds its rows; else None."""
        if self.fingerprint is None:
            return None
        try:
            with open(self.path) as f:
                record = json.load(f)
            size = os.path.getsize(self.raster_path)
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get('fingerprint') != self.fingerprint:
            return None
        rows, width = record.get('rows'), record.get('width')
        if not isinstance(rows, int) or not isinstance(width, int) or not 0 < rows or size < rows * width:
            return None
        return record

    def open_raster(self, height, width):
        """The raster, reopened at the recorded rows (a record of another size is ignored), or new."""
        if self.record and (self.record['height'], self.record['width']) != (height, width):
            self.record = None
        return LabelRaster(self.raster_path, height, width, self.record['rows'] if self.record else 0)

    def save(self, raster, **state):
        """Record the raster's rows with `state` (JSON values), once the rows are on disk: fsync and
        record are written in a background thread (they took 18 ms per 10 MB strip, measured),
        while the next strip is computed; the previous record is waited for first."""
        if self.fingerprint is None:
            return
        raster.file.flush()
        record = {'fingerprint': self.fingerprint, 'rows': raster.written, 'height': raster.height,
                  'width': raster.width, **state}
        self.wait()
        self._writer = threading.Thread(target=self._write, args=(os.dup(raster.file.fileno()), record))
        self._writer.start()

    def _write(self, fd, record):
        try:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            with atomic_write(self.path) as tmp, open(tmp, 'w') as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:  # raised by wait()
            self._error = e

    def wait(self):
        """Until the last record saved is on disk; its error, if writing it failed."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.join()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def finish(self):
        """Remove the record, then the raster (a kill in between leaves no record of a missing raster)."""
        self.wait()
        for path in (self.path, self.raster_path):
            if os.path.exists(path):
                os.remove(path)
