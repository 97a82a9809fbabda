"""What a segmented slide is written as, besides its pyramidal TIFF mask (tool/wsi/mask_tiff.py):

- regions as GeoJSON for QuPath: one valid polygon per connected region of each class, its holes
  kept, the polygons tiling the tissue, in level-0 pixel coordinates, with QuPath's
  classification (name and colour);
- areas: mm2 and fraction of the tissue of each class, and the whole-slide stroma area ratio;
- an overlay thumbnail to look at.

All read the mask from its LabelRaster, row by row or on a sampled grid.
"""
import json
import math

import numpy as np
import shapely

from tool.core.files import save_png, save_text
from tool.data.datasets import BACKGROUND, DATASETS
from tool.inference.image_source import PixelArray
from tool.inference.overlay import overlay
from tool.wsi.contours import region_polygons
from tool.wsi.slide_reader import SlideView

# The whole-slide stroma area ratio, stroma / (tumour + stroma) over all the slide's tissue. It is
# NOT the clinical tumour-stroma ratio (TSR), which a pathologist scores by eye in the single most
# stroma-rich field (about 10x, 2-3 mm across) at the tumour's invasive front and calls
# "stroma-high" above 50 %: a slide-wide average dilutes that field, so no high/low call is made
# from it. The classes each dataset calls tumour and stroma are in the registry.
OVERLAY_SIZE = 2048  # pixels on the longer side of the overlay thumbnail (or the mask's own, if smaller)


# ---- areas ------------------------------------------------------------------------------------

def label_counts(labels):
    """Pixels of each label 0..BACKGROUND."""
    return np.bincount(labels.ravel(), minlength=BACKGROUND + 1)


def area_columns(class_names):
    return ['tissue_mm2', *[f'{c}_{what}' for c in class_names for what in ('mm2', 'fraction')],
            'slide_stroma_area_ratio']


def areas(counts, mpp, class_names, dataset):
    """{column: value} of area_columns from the pixel count of each label (background last); mm2
    need the grid's resolution (blank without one), fractions are of the tissue (classes 0..3)."""
    tissue = int(counts[:len(class_names)].sum())
    mm2 = (lambda pixels: f'{pixels * mpp ** 2 / 1e6:.6f}') if mpp else (lambda pixels: '')
    row = {'tissue_mm2': mm2(tissue)}
    for index, name in enumerate(class_names):
        row[f'{name}_mm2'] = mm2(int(counts[index]))
        row[f'{name}_fraction'] = f'{counts[index] / tissue:.6f}' if tissue else ''
    tumour, stroma = (int(counts[DATASETS[dataset].class_of(tissue)]) for tissue in ('tumour', 'stroma'))
    ratio = stroma / (tumour + stroma) if tumour + stroma else None
    row['slide_stroma_area_ratio'] = '' if ratio is None else f'{ratio:.6f}'
    return row


# ---- GeoJSON for QuPath ---------------------------------------------------------------------------

def region_features(raster, class_names, palette, tolerance_px, level0_per_pixel):
    """GeoJSON features of every 4-connected region of every class, a valid Polygon each (holes
    kept), that tile the tissue: no two overlap. The mask is traced on its grid sampled every
    `tolerance_px` pixels (whole ones) and simplified to that, background included, so that
    regions along the glass share their edges with it too (tool/wsi/contours.py); regions that fit
    between the samples drop. Coordinates are level-0 pixels (`level0_per_pixel` per mask
    pixel), two decimals."""
    # Sampled, not every pixel: at the default 4 px, 1/16 of the grid in memory, 4x faster, class
    # areas 0.2-0.3 % off the mask's (every pixel: 0.1-0.2 %; bench/bench_geojson.py, 1500-px masks).
    step = max(1, math.floor(tolerance_px))
    height, width = math.ceil(raster.height / step), math.ceil(raster.width / step)
    region_labels, polygons = region_polygons(raster.sampled(height, width), tolerance_px / step)
    # cell corners -> mask pixels (cells of exactly raster / grid pixels) -> level 0
    scale = np.array([raster.width / width, raster.height / height]) * level0_per_pixel
    colours = np.asarray(palette, int).reshape(-1, 3)
    classifications = [{'name': name, 'color': colours[index].tolist()} for index, name in enumerate(class_names)]
    features = []
    for label, polygon in zip(region_labels, polygons):
        if label == BACKGROUND:
            continue
        rings = [np.round(shapely.get_coordinates(ring) * scale, 2).tolist()
                 for ring in (polygon.exterior, *polygon.interiors)]
        features.append({'type': 'Feature', 'geometry': {'type': 'Polygon', 'coordinates': rings},
                         'properties': {'objectType': 'annotation', 'classification': classifications[label]}})
    return features


def write_geojson(path, features):
    save_text(json.dumps({'type': 'FeatureCollection', 'features': features}, separators=(',', ':')) + '\n', path)


# ---- overlay thumbnail ----------------------------------------------------------------------------

def write_overlay_thumbnail(path, slide, downsample, raster, palette):
    """The mask's colours over the slide (the reference's 0.3 / 0.7 blend), at most OVERLAY_SIZE
    pixels on the longer side."""
    thumbnail_downsample = max(downsample, max(slide.width, slide.height) / OVERLAY_SIZE)
    view = SlideView(slide, thumbnail_downsample)
    labels = raster.sampled(view.height, view.width)
    save_png(overlay(PixelArray(view.read_all()), labels, palette, rows=128), path)
