"""Polygons of the regions of a binary mask: the outline and the holes of every connected region,
along the pixels' edges, then simplified.

    for outline, holes in region_polygons(mask):       # (n, 2) float arrays of x, y, closed
        ...

A pixel (row r, column c) is the square [c, c + 1] x [r, r + 1]. Every edge between a region
pixel and a non-region pixel is a boundary edge, directed so that the region lies on its right
when the image is drawn with y downwards (x, y) -> (x + 1, y) along the top of a pixel, down its
right side, back along its bottom, up its left side. Following the edges from corner to corner
closes them into rings. An outline then runs clockwise on screen, which is counter-clockwise
(positive area) in the usual x-right, y-up formula, as GeoJSON asks for outer rings; a hole runs
the other way. At a corner that two diagonal region pixels share, the ring turns so as to stay
with the same pixel: regions are 4-connected (scipy.ndimage.label's default), and a ring never
joins two of them. The area of a region's polygon (outline minus holes) is its pixel count,
exactly.
"""
import numpy as np
from scipy import ndimage

# Direction codes of the boundary edges and their (dx, dy).
STEPS = np.array([(1, 0), (0, 1), (-1, 0), (0, -1)])  # along a top, right, bottom, left side
# At a corner shared by two diagonal region pixels, a ring arriving in direction d leaves in
# TURN[d]: (dx, dy) -> (-dy, dx), round the pixel it came along.
TURN = np.array([1, 2, 3, 0])


def boundary_edges(mask):
    """(start x, start y, direction) of every boundary edge of the region pixels, and the (row,
    column) of the region pixel each edge belongs to."""
    padded = np.pad(mask, 1)
    inside = padded[1:-1, 1:-1]
    starts, pixels = [], []
    # A side is a boundary where the neighbour across it is outside; start corner of each side.
    for direction, (neighbour, corner) in enumerate((
            (padded[:-2, 1:-1], (0, 0)),    # top: the pixel above is outside; starts at the top-left corner
            (padded[1:-1, 2:], (1, 0)),     # right: starts at the top-right corner
            (padded[2:, 1:-1], (1, 1)),     # bottom: starts at the bottom-right corner
            (padded[1:-1, :-2], (0, 1)))):  # left: starts at the bottom-left corner
        rows, columns = np.nonzero(inside & ~neighbour)
        starts.append(np.stack([columns + corner[0], rows + corner[1], np.full_like(rows, direction)], 1))
        pixels.append(np.stack([rows, columns], 1))
    return np.concatenate(starts), np.concatenate(pixels)


def trace_rings(mask):
    """[(ring, pixel)]: every closed boundary ring of `mask` as (n + 1, 2) int corners (x, y), the
    first repeated at the end, with the (row, column) of a region pixel it runs along."""
    edges, pixels = boundary_edges(mask)
    if len(edges) == 0:
        return []
    width = mask.shape[1] + 1
    # One key per (start corner, direction); each corner has one edge leaving, or two at a
    # corner shared by diagonal region pixels.
    keys = ((edges[:, 1] * width + edges[:, 0]) * 4 + edges[:, 2]).astype(np.int64)
    order = np.argsort(keys)
    keys, edges, pixels = keys[order], edges[order], pixels[order]
    ends = edges[:, :2] + STEPS[edges[:, 2]]
    end_corners = (ends[:, 1] * width + ends[:, 0]).astype(np.int64)
    # The next edge: the one leaving the end corner in the turned direction if there is one
    # (a shared corner), else the only one leaving it.
    turned = np.searchsorted(keys, end_corners * 4 + TURN[edges[:, 2]])
    turned_exists = turned < len(keys)
    turned_exists[turned_exists] = keys[turned[turned_exists]] == (end_corners * 4 + TURN[edges[:, 2]])[turned_exists]
    only = np.searchsorted(keys, end_corners * 4)
    following = np.where(turned_exists, turned, only)
    rings, seen = [], np.zeros(len(edges), bool)
    for first in range(len(edges)):
        if seen[first]:
            continue
        ring, edge = [], first
        while not seen[edge]:
            seen[edge] = True
            ring.append(edge)
            edge = following[edge]
        corners = edges[ring, :2]
        rings.append((np.concatenate([corners, corners[:1]]), tuple(pixels[first])))
    return rings


def signed_area(ring):
    """Shoelace area of a closed ring (first point repeated last): positive for outlines."""
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def region_polygons(mask, tolerance=0.0):
    """[(outline, [holes])] of every 4-connected region of a bool mask, in pixel-edge coordinates,
    simplified to `tolerance` pixels (Douglas-Peucker; 0 keeps only the corners). Order: by the
    region's first pixel in reading order."""
    labels, count = ndimage.label(mask)
    outlines, holes = {}, {index: [] for index in range(1, count + 1)}
    for ring, (row, column) in trace_rings(mask):
        region = labels[row, column]
        ring = simplify_ring(ring, tolerance)
        if signed_area(ring) > 0:
            outlines[region] = ring
        else:
            holes[region].append(ring)
    return [(outlines[index], holes[index]) for index in range(1, count + 1)]


def simplify_ring(ring, tolerance):
    """A closed ring without its collinear corners, then Douglas-Peucker-simplified to `tolerance`;
    never below 3 corners (a region stays a polygon with area)."""
    points = ring[:-1]
    before, after = np.roll(points, 1, 0), np.roll(points, -1, 0)
    turning = cross(points - before, after - points) != 0
    corners = points[turning]
    if tolerance > 0 and len(corners) > 3:
        # Split the ring at its first corner and the corner farthest from it; simplify both halves.
        far = int(np.argmax(np.hypot(*(corners - corners[0]).T)))
        closed = np.concatenate([corners, corners[:1]])
        first_half = douglas_peucker(closed[:far + 1], tolerance)[:-1]
        kept = first_half + [far + i for i in douglas_peucker(closed[far:], tolerance)[:-1]]
        if len(kept) >= 3:
            corners = corners[kept]
    return np.concatenate([corners, corners[:1]]).astype(np.float64)


def douglas_peucker(points, tolerance):
    """Indices of the points of an open polyline that Douglas-Peucker keeps (first and last
    always): a point goes when it lies within `tolerance` of the chord of the points kept around it."""
    keep = np.zeros(len(points), bool)
    keep[[0, -1]] = True
    spans = [(0, len(points) - 1)]
    while spans:
        start, end = spans.pop()
        if end - start < 2:
            continue
        chord = points[end] - points[start]
        offsets = points[start + 1:end] - points[start]
        length = np.hypot(*chord)
        distance = np.abs(cross(chord[None], offsets)) / length if length else np.hypot(*offsets.T)
        farthest = int(np.argmax(distance))
        if distance[farthest] > tolerance:
            middle = start + 1 + farthest
            keep[middle] = True
            spans += [(start, middle), (middle, end)]
    return np.flatnonzero(keep).tolist()


def cross(a, b):
    """z of the cross products of 2-D vectors (rows of a and b)."""
    return a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
