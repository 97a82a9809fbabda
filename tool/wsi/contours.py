"""Polygons that tile a label image: every 4-connected region of every label as a valid shapely
Polygon along the pixels' edges, all simplified together as one coverage.

    region_labels, polygons = region_polygons(labels, tolerance_px)   # one label and Polygon a region

A pixel (row r, column c) is the square [c, c + 1] x [r, r + 1]. Every pixel edge between two
regions (or a region and the outside) is traced twice, once for each side, directed so that the
region lies on its right when the image is drawn with y downwards; at a corner that two diagonal
pixels of one region share, a ring turns so as to stay with its pixel, unless that makes it pass
twice through the corner (a region that curls round until it touches itself diagonally): such a
ring would not be simple (OGC's "Ring Self-intersection"), so it is split there into an outline
and a hole that touch at that point, which OGC allows. An outline runs counter-clockwise
(positive area) in the usual x-right, y-up formula, as GeoJSON asks for outer rings; a hole runs
the other way.

A ring keeps only the corners where it turns or where three or more regions meet, so both regions
along an edge have the same vertices on it: the polygons are an exact coverage (an edge-matched
tiling). shapely.coverage_simplify (GEOS, Visvalingam-Whyatt) then simplifies each shared edge once
for both sides: simplified regions neither overlap nor open gaps, and vertices where regions meet
stay. It removes no region; a small one becomes a triangle at least.
"""
import cv2
import numpy as np
import shapely
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, depth_first_order

# Direction codes of the boundary edges and their (dx, dy).
STEPS = np.array([(1, 0), (0, 1), (-1, 0), (0, -1)])  # along a top, right, bottom, left side
# At a corner shared by two diagonal pixels of a region, a ring arriving in direction d leaves in
# TURN[d]: (dx, dy) -> (-dy, dx), round the pixel it came along.
TURN = np.array([1, 2, 3, 0])


def region_polygons(labels, tolerance_px=0.0):
    """(label of each region, its valid shapely Polygon) for every 4-connected region of every
    label of a 2-D integer image, in pixel-edge coordinates, simplified together to `tolerance_px`
    pixels (0: exact; a polygon's area is then its region's pixel count). Order: by label, then by
    the region's first pixel in reading order."""
    regions, region_labels = label_regions(labels)
    rings, ring_regions, outlines = trace_rings(regions, kept_corners(regions))
    order = np.lexsort([~outlines, ring_regions])  # each region's outline, then its holes
    polygons = shapely.polygons(rings[order], indices=ring_regions[order])
    if tolerance_px > 0:
        # The image's frame stays: it is straight, and regions along it keep their exact extent.
        polygons = shapely.coverage_simplify(polygons, tolerance_px, simplify_boundary=False)
    return region_labels, shapely.orient_polygons(polygons)


def label_regions(labels):
    """The index (0, 1, ...) of the 4-connected region of every pixel, numbered label by label in
    reading order, and the label of each region."""
    regions = np.empty(labels.shape, np.int64)
    region_labels = []
    for value in np.unique(labels):
        count, numbers = cv2.connectedComponents((labels == value).astype(np.uint8), connectivity=4)
        where = numbers > 0
        regions[where] = numbers[where] + (len(region_labels) - 1)
        region_labels += [value] * (count - 1)  # cv2 counts the rest of the image as component 0
    return regions, np.array(region_labels, labels.dtype)


def kept_corners(regions):
    """(height + 1, width + 1) bool: the pixel corners a ring keeps, all but those in the middle of
    a straight edge between two regions."""
    padded = np.pad(regions, 1, constant_values=-1)
    a, b, c, d = padded[:-1, :-1], padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:]  # NW, NE, SW, SE
    horizontal = (a == b) & (c == d)  # one region above the corner, one below
    vertical = (a == c) & (b == d)
    return ~(horizontal ^ vertical)  # neither: a turn or a junction (both: inside, on no ring)


def boundary_edges(regions):
    """(start x, start y, direction, region) of every boundary edge of every region."""
    padded = np.pad(regions, 1, constant_values=-1)
    inside = padded[1:-1, 1:-1]
    edges = []
    # A side is a boundary where the pixel across it is of another region; start corner of each side.
    for direction, (neighbour, (dx, dy)) in enumerate((
            (padded[:-2, 1:-1], (0, 0)),    # top: starts at the top-left corner
            (padded[1:-1, 2:], (1, 0)),     # right: starts at the top-right corner
            (padded[2:, 1:-1], (1, 1)),     # bottom: starts at the bottom-right corner
            (padded[1:-1, :-2], (0, 1)))):  # left: starts at the bottom-left corner
        rows, columns = np.nonzero(inside != neighbour)
        edges.append(np.stack([columns + dx, rows + dy, np.full_like(rows, direction), inside[rows, columns]], 1))
    return np.concatenate(edges)


def trace_rings(regions, kept):
    """Every closed boundary ring of every region as a shapely LinearRing of its `kept` corners,
    the region it bounds, and whether it is the region's outline (else a hole)."""
    edges = boundary_edges(regions)
    corners = kept.size
    width = kept.shape[1]
    # One key per (region, start corner, direction); a region has one edge leaving a corner, or
    # two at a corner that two of its diagonal pixels share.
    keys = ((edges[:, 3] * corners + edges[:, 1] * width + edges[:, 0]) * 4 + edges[:, 2])
    order = np.argsort(keys)
    keys, edges = keys[order], edges[order]
    ends = edges[:, :2] + STEPS[edges[:, 2]]
    end_keys = (edges[:, 3] * corners + ends[:, 1] * width + ends[:, 0]) * 4
    # The next edge: the only one leaving the end corner, or at a corner with two (shared by
    # diagonal pixels) the one in the turned direction.
    leaving = np.searchsorted(keys, end_keys)
    shared = np.searchsorted(keys, end_keys + 4) - leaving == 2
    following = np.where(shared, np.searchsorted(keys, end_keys + TURN[edges[:, 2]]), leaving)
    # A ring that passes twice through a shared corner (its region touches itself there) is not
    # simple: its two passes swap the edges they leave by, which splits it into two rings that
    # touch at the corner, an outline and a hole. The passes through different corners never
    # interleave along a ring (it does not cross itself), so all swaps split.
    arriving = np.flatnonzero(shared)[np.argsort(end_keys[shared], kind='stable')].reshape(-1, 2)
    cycle = cycle_of(following)
    pinched = arriving[cycle[arriving[:, 0]] == cycle[arriving[:, 1]]]
    following[pinched] = following[pinched[:, ::-1]]
    ring_edges, first = cycles(following)
    ring = np.cumsum(first) - 1  # of every edge, in ring order
    edges, ring_regions = edges[ring_edges], edges[ring_edges[first], 3]
    kept_edges = kept[edges[:, 1], edges[:, 0]]
    points, ring = edges[kept_edges, :2].astype(np.float64), ring[kept_edges]
    return shapely.linearrings(points, indices=ring), ring_regions, ring_areas(points, ring) > 0


def cycle_of(following):
    """The cycle (0, 1, ...) of every element of a permutation."""
    count = len(following)
    graph = csr_matrix((np.ones(count, np.int8), (np.arange(count), following)), shape=(count, count))
    return connected_components(graph, connection='weak')[1]


def cycles(following):
    """The elements of a permutation ordered cycle by cycle, each cycle from its smallest element
    in the order the permutation steps through it, and whether each starts a cycle."""
    count = len(following)
    is_first = np.zeros(count, bool)
    is_first[np.unique(cycle_of(following), return_index=True)[1]] = True
    # Cut every cycle before its first element and hang the first elements under one root
    # (index `count`): a depth-first walk from the root then runs through the cycles one by one.
    links = ~is_first[following]
    sources = np.concatenate([np.flatnonzero(links), np.full(is_first.sum(), count)])
    targets = np.concatenate([following[links], np.flatnonzero(is_first)])
    graph = csr_matrix((np.ones(len(sources), np.int8), (sources, targets)), shape=(count + 1, count + 1))
    walk = depth_first_order(graph, count, directed=True, return_predecessors=False)[1:]
    return walk, is_first[walk]


def ring_areas(points, ring):
    """Shoelace area of each ring (points grouped by ring, not closed): positive for outlines."""
    starts = np.flatnonzero(np.diff(ring, prepend=-1))
    following = np.arange(1, len(points) + 1)
    following[np.r_[starts[1:], len(points)] - 1] = starts  # a ring's last point -> its first
    x, y = points.T
    return 0.5 * np.add.reduceat(x * y[following] - x[following] * y, starts)
