"""GeoJSON regions (tool/wsi/slide_outputs.py region_features): one shapely coverage, simplified together,
against the per-ring Douglas-Peucker tracer it replaced, on masks like a segmented slide's.

    python -m bench.bench_geojson                        # 1500 x 1500, seeds 0-2, tolerance 4, 1 and 0 px
    python -m bench.bench_geojson --size 600 --seeds 1

The masks are tests/test_contours.tissue_mask's: compartments of four classes with rough borders,
holes, islands and specks on glass, 13,000-17,000 regions at 1500 px. "old" is tool/wsi/contours.py of
--old_revision (the last with Douglas-Peucker) with that revision's region_features, copied here;
"new" is region_features, which traces the grid sampled every tolerance pixels (whole ones);
"new, every px" traces every pixel instead. Printed for each: the polygons, how many are invalid
(shapely.is_valid), the area that two classes cover (% of the tissue: the class unions' areas
minus the area of their union; invalid polygons made valid first), the area error (|polygon area
- pixel count| summed over the classes, % of the tissue) and the seconds the polygons took.
"""
import argparse
import importlib.util
import math
import os
import subprocess
import tempfile
import time

import numpy as np
import shapely

from tests.test_contours import tissue_mask
from tool.data.datasets import BACKGROUND, DATASETS
from tool.wsi.contours import region_polygons
from tool.wsi.label_raster import LabelRaster
from tool.wsi.slide_outputs import region_features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = DATASETS['luad'].class_names


def load_old_contours(revision, folder):
    source = subprocess.run(['git', 'show', f'{revision}:tool/wsi/contours.py'], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = os.path.join(folder, 'old_contours.py')
    with open(path, 'w') as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location('old_contours', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def old_polygons(contours, raster, tolerance):
    """(class, Polygon) of each region as the old region_features made them: class by class, each
    ring simplified on its own."""
    step = max(1, math.floor(tolerance))
    height, width = math.ceil(raster.height / step), math.ceil(raster.width / step)
    grid = raster.sampled(height, width)
    scale = np.array([raster.width / width, raster.height / height])
    return [(index, shapely.Polygon(outline * scale, [hole * scale for hole in holes]))
            for index in range(len(CLASSES))
            for outline, holes in contours.region_polygons(grid == index, tolerance / step)]


def new_polygons(raster, tolerance):
    features = region_features(raster, CLASSES, DATASETS['luad'].palette, tolerance, 1)
    return [(CLASSES.index(f['properties']['classification']['name']), shapely.geometry.shape(f['geometry']))
            for f in features]


def every_pixel_polygons(labels, tolerance):
    region_labels, polygons = region_polygons(labels, tolerance)
    return [(label, polygon) for label, polygon in zip(region_labels, polygons) if label != BACKGROUND]


def scores(labels, regions):
    """polygons, invalid, overlap %, area error % of [(class, Polygon)]."""
    classes = np.array([c for c, _ in regions])
    polygons = np.array([p for _, p in regions])
    valid = shapely.is_valid(polygons)
    polygons[~valid] = shapely.make_valid(polygons[~valid])
    counts = np.bincount(labels.ravel(), minlength=BACKGROUND + 1)[:BACKGROUND]
    tissue = counts.sum()
    unions = [shapely.union_all(polygons[classes == c]) for c in range(len(CLASSES))]
    overlap = sum(u.area for u in unions) - shapely.union_all(unions).area
    areas = np.array([shapely.area(polygons[classes == c]).sum() for c in range(len(CLASSES))])
    return len(polygons), int((~valid).sum()), 100 * overlap / tissue, 100 * np.abs(areas - counts).sum() / tissue


def timed(run):
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def main(args):
    print(f'{"seed":>4} {"tol px":>6}  {"path":<14}{"polygons":>9}{"invalid":>8}{"overlap %":>11}'
          f'{"area err %":>11}{"seconds":>9}')
    with tempfile.TemporaryDirectory() as folder:
        old = load_old_contours(args.old_revision, folder)
        for seed in range(args.seeds):
            labels = tissue_mask(args.size, seed)
            raster = LabelRaster(os.path.join(folder, 'labels.raw'), *labels.shape)
            raster.append(labels)
            for tolerance in args.tolerances:
                paths = {'old': lambda: old_polygons(old, raster, tolerance),
                         'new': lambda: new_polygons(raster, tolerance)}
                if tolerance >= 2:  # below, region_features traces every pixel itself
                    paths['new, every px'] = lambda: every_pixel_polygons(labels, tolerance)
                for name, run in paths.items():
                    regions, seconds = timed(run)
                    count, invalid, overlap, error = scores(labels, regions)
                    print(f'{seed:>4} {tolerance:>6g}  {name:<14}{count:>9}{invalid:>8}{overlap:>11.3f}'
                          f'{error:>11.3f}{seconds:>9.2f}', flush=True)
            raster.close()


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size', type=int, default=1500, help='mask side, px')
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--tolerances', type=float, nargs='+', default=[4, 1, 0],
                        help='grid px (4: the default 4 um at 1 um/px)')
    parser.add_argument('--old_revision', default='b678bfc', help='a commit whose tool/wsi/contours.py has Douglas-Peucker')
    main(parser.parse_args())
