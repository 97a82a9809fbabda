"""Whole-slide results against a known truth: synthetic slides (tool/data/synth_slide.py) segmented by
4_infer.py, scored like their own patches.

    python -m tool.data.synth_slide --out slides/ --size 288 --cells 5          # the project's own data
    python -m tool.data.synth_slide --out slides/ --size 288 --cells 5 --variant heldout --seed 1
    python -m bench.bench_slide_truth --slides slides/ --checkpoint stage2.pth [--extra '--tile 224']

Cells of 288 px (three 96-px tiles): on a mosaic of patch-sized cells every tile would straddle
unrelated patches, and the seams, not the pipeline, would be measured.

For every slide: the patches it is made of, predicted one by one (patch MIoU); then the slide
with 4_infer.py's defaults and with the flags given after --extra. Printed per run: MIoU over the
tissue classes (background excluded, as the paper's tables), the share of the white inside the
tissue (truth 4 within the tissue's cells) labelled background, the share of the tissue labelled
background (lost to tissue detection or the white rule), and seconds.
"""
import argparse
import glob
import json
import os
import shlex
import tempfile
import time

import tifffile

from tool.core.errors import run_cli
from tool.data.datasets import BACKGROUND, DATASETS
from tool.data.patches import read_mask
from tool.inference import infer
from tool.method.metrics import ConfusionMatrix


def run_infer(argv):
    start = time.perf_counter()
    run_cli(infer.main, infer.get_args_parser().parse_args([str(a) for a in argv]))
    return time.perf_counter() - start


def patch_scores(stem, checkpoint, out):
    seconds = run_infer(['--checkpoint', checkpoint, '--input', f'{stem}-patches/img', '--masks',
                         f'{stem}-patches/mask', '--out', out, '--workers', 0])
    with open(os.path.join(out, 'metrics.json')) as f:
        return {'miou': json.load(f)['miou'], 'seconds': seconds}


def slide_scores(stem, checkpoint, out, extra):
    name = os.path.basename(stem)
    seconds = run_infer(['--checkpoint', checkpoint, '--input', f'{stem}.tiff', '--out', out, *extra])
    predicted = tifffile.imread(os.path.join(out, 'slides', name, f'{name}-mask.tiff'))  # the full-resolution page
    truth = read_mask(f'{stem}-truth.png')
    confusion = ConfusionMatrix(len(DATASETS['luad'].class_names))
    confusion.update(truth, predicted)
    tissue = truth < BACKGROUND
    white_in_tissue = (truth == BACKGROUND) & (read_mask(f'{stem}-cells.png') == 1)
    background = predicted == BACKGROUND
    return {'miou': confusion.scores()['miou'], 'seconds': seconds, 'white': background[white_in_tissue].mean(),
            'lost': background[tissue].mean()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--slides', required=True, help='a folder of tool/data/synth_slide.py slides')
    parser.add_argument('--checkpoint', required=True)
    parser.add_argument('--extra', default='--tile 224', help='flags of the second slide run (one string)')
    args = parser.parse_args()
    print('| slide | run | MIoU | white in tissue -> background | tissue -> background | seconds |')
    print('|---|---|---:|---:|---:|---:|')
    for path in sorted(glob.glob(os.path.join(args.slides, '*.tiff'))):
        stem = path[:-len('.tiff')]
        name = os.path.basename(stem)
        with tempfile.TemporaryDirectory() as out:
            patches = patch_scores(stem, args.checkpoint, out)
        print(f'| {name} | its patches, one by one | {patches["miou"]:.3f} | | | {patches["seconds"]:.0f} |')
        for label, extra in (('slide, defaults', []), (f'slide, {args.extra}', shlex.split(args.extra))):
            with tempfile.TemporaryDirectory() as out:
                row = slide_scores(stem, args.checkpoint, out, extra)
            print(f'| {name} | {label} | {row["miou"]:.3f} | {row["white"]:.3f} | {row["lost"]:.3f} | '
                  f'{row["seconds"]:.0f} |')


if __name__ == '__main__':
    main()
