"""One whole slide, end to end: tissue, segmentation at the model's resolution, outputs.

    row = segment_slide(path, name, predictor, settings, folder)

1. The grid: --mpp (the model's resolution, by --dataset), --slide_mpp or --level
   (tool/wsi/slide_reader.py).
2. Tissue: detected on a thumbnail of TISSUE_MPP um per pixel (tool/wsi/tissue.py), unless turned
   off. Only the box around the tissue is read, and only its tiles that hold tissue go through
   the network: a tile without tissue is skipped, and every pixel on glass is background (4).
3. Segmentation: overlapping tiles blended strip by strip (tool/inference/sliding_window.py); each finished
   strip goes to a LabelRaster on disk, so memory holds a strip of tiles, never the mask. Given a
   fingerprint, a progress record follows each strip, and a killed run goes on from the last one
   (tool/wsi/label_raster.py Progress): the same mask, byte for byte.
4. Outputs in `folder`, read back from the raster: <name>-mask.tiff (pyramidal, with its
   resolution), <name>.geojson (regions for QuPath), <name>-overlay.png; the returned row has the
   areas, the whole-slide stroma area ratio and the tiles run and skipped.
"""
import os
import time

import numpy as np
from tqdm import tqdm

from tool.data.datasets import BACKGROUND, DATASETS
from tool.inference.sliding_window import argmax, blended_rows, resumed_tiles, tile_grid
from tool.wsi.label_raster import Progress
from tool.wsi.mask_tiff import write_mask_tiff
from tool.wsi.slide_outputs import areas, label_counts, region_features, write_geojson, write_overlay_thumbnail
from tool.wsi.slide_reader import SlideView, WholeSlide, segmentation_grid
from tool.wsi.tissue import TISSUE_MPP, TissueMap, detect_tissue


def slide_plan(slide, settings):
    """(downsample, mpp or None, size_mpp) of the grid to segment `slide` on, at settings.model_mpp
    (the resolution the model learnt at). size_mpp converts the sizes given in um (tissue
    detection, polygon tolerance): the grid's resolution, or for a level of unknown resolution
    (--level without metadata) the model's, which the user chose that level to match."""
    downsample, mpp = segmentation_grid(slide, settings.model_mpp, settings.slide_mpp, settings.level)
    return downsample, mpp, mpp or settings.model_mpp


def find_tissue(slide, downsample, size_mpp, settings):
    """The TissueMap of the grid: detected on a thumbnail, or everywhere with detection off."""
    grid = slide.grid_size(downsample)
    if settings.no_tissue_detection:
        return TissueMap.everywhere(grid)
    thumbnail_downsample = downsample * TISSUE_MPP / size_mpp
    thumbnail = SlideView(slide, thumbnail_downsample).read_all()
    mask = detect_tissue(thumbnail, TISSUE_MPP, settings.tissue_saturation, settings.tissue_closing,
                         settings.tissue_min_area)
    return TissueMap(mask, downsample / thumbnail_downsample, grid)


def tiles_with_tissue(tissue, box, tile, overlap):
    """{(y, x)}: the tiles of the box (corners relative to it) that hold tissue."""
    x0, y0, width, height = box
    tile_h, tile_w, ys, xs = tile_grid(height, width, tile, overlap)
    return {(y, x) for y in ys for x in xs if tissue.rows(y0 + y, tile_h, x0 + x, tile_w).any()}


def tissue_blind_tiles(height, width, tile, overlap):
    """How many tiles a run without tissue detection takes: those covering the whole grid."""
    _, _, ys, xs = tile_grid(height, width, tile, overlap)
    return len(ys) * len(xs)


def segment(slide, downsample, tissue, predictor, settings, raster, name, progress=None):
    """Segment the tissue's box into `raster`, background elsewhere; (label counts, tiles run).
    progress (a Progress): recorded after each strip; a raster it reopened at row R (a killed run's)
    is continued from R, the counts from its record, only the rows of tiles reaching below R run again."""
    height, width = raster.height, raster.width
    counts = np.zeros(BACKGROUND + 1, np.int64)
    box = tissue.box()
    if box is None:  # no tissue: a valid, empty result
        raster.append_constant(BACKGROUND, height)
        counts[BACKGROUND] = height * width
        return counts, 0
    x0, y0, box_width, box_height = box
    resumed = raster.written  # a killed run's rows (progress is only recorded inside the box)
    if resumed:
        counts[:] = progress.record['counts']
    else:
        raster.append_constant(BACKGROUND, y0)
        counts[BACKGROUND] += y0 * width
    start_row = raster.written - y0
    predicted = tiles_with_tissue(tissue, box, settings.tile, settings.overlap)
    kept = resumed_tiles(box_height, box_width, settings.tile, settings.overlap, start_row, predicted)
    if resumed:  # print, not log (the main process's voice only): any process may resume a slide
        print(f'{name}: resuming at row {resumed} of {height} ({kept} tiles done)')
    with tqdm(total=len(predicted), initial=kept, unit='tile', desc=name, leave=False) as bar:
        def predict(tiles):
            bar.update(len(tiles))
            return predictor(tiles)
        for y, probs in blended_rows(SlideView(slide, downsample, box), predict, settings.tile, settings.overlap,
                                     settings.batch_size, skip=lambda y, x: (y, x) not in predicted,
                                     start_row=start_row):
            labels = np.full((probs.shape[1], width), BACKGROUND, np.uint8)
            labels[:, x0:x0 + box_width] = argmax(probs, dim=0)
            labels[~tissue.rows(y0 + y, probs.shape[1])] = BACKGROUND
            raster.append(labels)
            counts += label_counts(labels)
            if progress is not None:
                progress.save(raster, counts=counts.tolist(), tiles=bar.n)
    below = height - y0 - box_height
    raster.append_constant(BACKGROUND, below)
    counts[BACKGROUND] += below * width
    return counts, len(predicted)


def segment_slide(path, name, predictor, settings, folder, fingerprint=None):
    """Segment one slide and write its outputs into `folder`; the slide's row of the cohort table.
    fingerprint: of everything the mask depends on; with one, progress is recorded in `folder` after
    each strip, and a killed run's progress there with the same fingerprint is continued."""
    start = time.perf_counter()
    class_names, palette = DATASETS[settings.dataset].class_names, DATASETS[settings.dataset].palette
    with WholeSlide(path) as slide:
        downsample, mpp, size_mpp = slide_plan(slide, settings)
        tissue = find_tissue(slide, downsample, size_mpp, settings)
        height, width = slide.grid_size(downsample)
        progress = Progress(folder, fingerprint)
        raster = progress.open_raster(height, width)
        try:
            segment_start, ran = time.perf_counter(), []  # tiles predicted here (a resumed run: not all)

            def counted(tiles):
                ran.append(len(tiles))
                return predictor(tiles)
            counts, tiles_run = segment(slide, downsample, tissue, counted, settings, raster, name, progress)
            tiles_per_second = sum(ran) / (time.perf_counter() - segment_start)
            write_mask_tiff(os.path.join(folder, f'{name}-mask.tiff'), raster, palette, mpp)
            features = region_features(raster, class_names, palette, tolerance_px=settings.geojson_tolerance / size_mpp,
                                       level0_per_pixel=downsample)
            write_geojson(os.path.join(folder, f'{name}.geojson'), features)
            write_overlay_thumbnail(os.path.join(folder, f'{name}-overlay.png'), slide, downsample, raster, palette)
        finally:
            try:
                progress.wait()  # the last record written before the caller may clear the folder
            finally:
                raster.close()  # kept on failure: what the record says is done (the caller clears the folder)
        progress.finish()
        level = slide.level_for(downsample)
    tiles_all = tissue_blind_tiles(height, width, settings.tile, settings.overlap)
    return {'slide': name, 'mpp': f'{mpp:.4f}' if mpp else '', 'level': level, 'width': width, 'height': height,
            **areas(counts, mpp, class_names, settings.dataset),
            'tiles_run': tiles_run, 'tiles_skipped': tiles_all - tiles_run,
            'tiles_per_second': f'{tiles_per_second:.2f}',
            'seconds': f'{time.perf_counter() - start:.1f}', 'path': os.path.abspath(path)}
