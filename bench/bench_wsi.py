"""Whole-slide inference speed: tiles per second on a slide, the share of tiles that tissue
detection skips, and --amp (bfloat16) against float32: its speed-up and the pixels it changes.

    python -m bench.bench_wsi --slide cmu_small_region.svs --checkpoint stage2.pth [--threads 2]

Both precisions segment the slide exactly as 4_infer.py does (tool/wsi/slide_inference.py: the grid
at --mpp, tissue detection, tiles blended strip by strip into a mask on disk), in turn after a
warm-up; the best run of each counts. Reading and resampling the slide are part of the time, as
in a real run; tissue detection and writing the outputs are not. On the CPU, --amp means
bfloat16 where the CPU has instructions for it (AVX512-BF16 or AMX: `lscpu | grep bf16`).
"""
import argparse
import os
import tempfile
import time

import torch

from bench.timing import device_name
from tool.core.checkpoint import load_checkpoint
from tool.core.runtime import resolve_device
from tool.data.datasets import BACKGROUND, DATASETS
from tool.inference import infer
from tool.wsi.label_raster import LabelRaster
from tool.wsi.slide_inference import find_tissue, segment, slide_plan, tiles_with_tissue, tissue_blind_tiles
from tool.wsi.slide_reader import WholeSlide


def segment_timed(slide, plan, tissue, predictor, settings, folder):
    """(uint8 mask, tiles run, seconds) of one segmentation of the slide."""
    downsample = plan[0]
    raster = LabelRaster(os.path.join(folder, 'labels.raw'), *slide.grid_size(downsample))
    try:
        start = time.perf_counter()
        _, tiles = segment(slide, downsample, tissue, predictor, settings, raster, 'bench')
        seconds = time.perf_counter() - start
        return raster.rows(0, raster.height).copy(), tiles, seconds
    finally:
        raster.close()


def main(args):
    device = resolve_device(args.device)
    if device.type == 'cpu':
        torch.set_num_threads(args.threads)
    settings = infer.get_args_parser().parse_args(
        ['--checkpoint', args.checkpoint, '--input', args.slide, '--out', '.', '--dataset', args.dataset,
         '--tile', str(args.tile), '--overlap', str(args.overlap), '--batch_size', str(args.batch_size),
         *(['--mpp', str(args.mpp)] if args.mpp else [])])
    checkpoint = load_checkpoint(args.checkpoint)
    infer.choose_model_input(settings, infer.recorded_input(checkpoint), needs_mpp=True)
    predictors = {}
    for name, amp in (('float32', False), ('bfloat16', True)):
        settings.amp = amp
        predictors[name] = infer.load_predictor(settings, checkpoint, device, len(DATASETS[args.dataset].class_names))
    with WholeSlide(args.slide) as slide, tempfile.TemporaryDirectory() as folder:
        plan = slide_plan(slide, settings)
        downsample, mpp = plan[:2]
        tissue = find_tissue(slide, downsample, plan[2], settings)
        height, width = slide.grid_size(downsample)
        blind = tissue_blind_tiles(height, width, args.tile, args.overlap)
        box = tissue.box()
        run = len(tiles_with_tissue(tissue, box, args.tile, args.overlap)) if box else 0
        print(f'{os.path.basename(args.slide)}: {slide.width} x {slide.height} px at {slide.mpp} um; segmented at '
              f'{mpp} um per pixel from level {slide.level_for(downsample)} ({width} x {height} grid), '
              f'{args.tile}-px tiles, {device} ({device_name(device)})')
        print(f'tiles: {run} run of the {blind} a tissue-blind run would take; {blind - run} skipped '
              f'({(blind - run) / blind:.1%})')
        masks, rates = {}, {name: [] for name in predictors}
        for name, predictor in predictors.items():  # warm-up
            segment_timed(slide, plan, tissue, predictor, settings, folder)
        for _ in range(args.repeats):
            for name, predictor in predictors.items():
                masks[name], tiles, seconds = segment_timed(slide, plan, tissue, predictor, settings, folder)
                rates[name].append(tiles / seconds)
    for name, values in rates.items():
        print(f'{name:<10}{max(values):8.2f} tiles/s  (each run: {", ".join(f"{v:.2f}" for v in values)})')
    print(f'speed-up bfloat16 / float32: {max(rates["bfloat16"]) / max(rates["float32"]):.2f}x')
    on_tissue = masks['float32'] != BACKGROUND
    changed = int((masks['float32'] != masks['bfloat16']).sum())
    print(f'pixels changed by bfloat16: {changed} of {int(on_tissue.sum())} tissue pixels '
          f'({changed / max(1, on_tissue.sum()):.3%})')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--slide', required=True, help='a whole-slide image (.svs, pyramidal .tiff, ...)')
    parser.add_argument('--checkpoint', required=True, help='stage-2 DeepLab weights')
    parser.add_argument('--dataset', default='luad', choices=sorted(DATASETS))
    parser.add_argument('--mpp', type=float, help='um per pixel to segment at (default: the dataset\'s)')
    parser.add_argument('--tile', type=int, default=224)
    parser.add_argument('--overlap', type=int, default=32)
    parser.add_argument('--batch_size', type=int, default=16)
    parser.add_argument('--repeats', type=int, default=2, help='timed runs per precision (the best counts)')
    parser.add_argument('--device', default='cpu', help='cpu, cuda or auto')
    parser.add_argument('--threads', type=int, default=2, help='CPU threads')
    return parser.parse_args(argv)


if __name__ == '__main__':
    main(parse_args())
