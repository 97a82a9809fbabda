r"""Inference: segment tissue images with a trained stage-2 model, optionally gated by stage 1.

    python 4_infer.py --checkpoint checkpoints/stage2_checkpoint_trained_on_luad.pth \
        --input images/ --out results/ [--stage1 stage1.pth --gate mask] [--masks truth/]

Patches and large images (PNG, JPEG, flat TIFF) are written to --out, one file at a time and
atomically (a finished image is skipped on the next run unless --overwrite):
    masks/<name>.png      palette PNG of class indices in the dataset's palette
    overlays/<name>.png   the mask's colours over the image, 0.3 colour + 0.7 image (the
                          reference's fuse_mask_and_img)
    areas.csv             every mask in masks/: pixel count and area fraction of each class
    metrics.json          with --masks: scores against the ground-truth masks (background 4 excluded)

The model sees every pixel at the size it was trained on (--tile, by default the patch size
recorded in the checkpoint): DeepLab's image-level pooling makes each pixel's prediction depend
on the input's extent, so a model trained on 96 px patches and run on 224 px inputs paints other
tissue. Images of one tile or smaller are predicted whole, many to a batch (a smaller one padded
to the tile by reflection, the padding cropped off), exactly as the reference's test phase does
for its 224 px patches. Larger ones are cut into overlapping tiles whose predictions are blended
strip by strip (tool/inference/sliding_window.py), so memory grows with the image width, never with its
area times the classes.

White non-tissue (air in alveoli and lumens, glass) is background (4) as in the dataset's labels:
the pseudo-mask rule (tool/method/pseudo_mask.py: grey > 200, specks under 50 px kept) is applied to
each tile at the model's resolution, for LUAD-style data; BCSS-style data keep white as tissue
(fat), as its labels do. --white_background decides it otherwise.

Whole slides (.svs, .ndpi, ..., pyramidal TIFF; a folder or a CSV list of them) are segmented at
the model's resolution, tissue only, into slides/<name>/ and one cohort.csv: tool/wsi/cohort.py and
tool/wsi/slide_inference.py; under torchrun the slides are shared among the processes.
"""
import argparse
import csv
import io
import json
import os

import numpy as np
import torch
from tqdm import tqdm

from network.deeplab import CLASSIFIER
from tool.core.checkpoint import extract_state_dict, load_checkpoint, read_state_dict
from tool.core.distributed import init_distributed_mode, is_main_process
from tool.core.errors import InputError
from tool.core.files import save_palette_png, save_png, save_text
from tool.core.log import log
from tool.core.models import classifier_from_state_dict, deeplab_from_state_dict
from tool.core.runtime import (autocast, autocast_dtype, configure_cuda_speed, data_workers, resolve_device,
                               write_run_record)
from tool.data.datasets import DATASETS, REFERENCE_PATCH_SIZE
from tool.data.patches import read_mask
from tool.inference.image_source import (EXTENSIONS, PixelArray, ReflectPadded, image_height_width, is_slide,
                                         large_images_allowed, open_image, reflect_pad)
from tool.inference.overlay import overlay
from tool.inference.sliding_window import argmax, blended_rows
from tool.method.gate import GATE_MODES, GATE_THRESHOLD, gate_classes, gated_logits
from tool.method.metrics import ConfusionMatrix, format_table, scores_to_json
from tool.method.pseudo_mask import background_mask, uses_white_background
from tool.wsi.cohort import read_slide_list, run_cohort
from tool.wsi.slide_outputs import label_counts
from tool.wsi.tissue import CLOSING_UM, MIN_AREA_UM2


def get_args_parser():
    parser = argparse.ArgumentParser(
        description='Segment tissue images with a stage-2 checkpoint (patches, large PNG/TIFF, whole slides).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--checkpoint', required=True,
                        help='stage-2 DeepLab weights: the released stage2_checkpoint_trained_on_*.pth or ours '
                             '({"state_dict": ...}) or a bare state_dict; backbone and classes are read from it')
    parser.add_argument('--stage1', help='stage-1 classifier weights: turns the classification gate on')
    parser.add_argument('--gate', choices=GATE_MODES,
                        help='with --stage1: multiply (the reference; default) or mask (absent classes cannot win). '
                             'On an image larger than --tile the gate decides per tile, because the stage-1 '
                             'classifier was trained on patch-sized inputs')
    parser.add_argument('--gate_threshold', type=float, default=GATE_THRESHOLD,
                        help='a class is present where the stage-1 sigmoid exceeds this')
    parser.add_argument('--input', required=True,
                        help=f'an image or slide, a folder of them ({" ".join(EXTENSIONS)}), or a CSV list of '
                             'slides (a column "path" or "slide"); output names are the file names without extension')
    parser.add_argument('--out', required=True, help='output folder')
    parser.add_argument('--dataset', default='luad', choices=sorted(DATASETS), help='class names and palette')
    parser.add_argument('--masks', help='folder of ground-truth palette masks <name>.png: writes metrics.json')
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    parser.add_argument('--batch_size', type=int, default=16, help='images or tiles per forward pass')
    parser.add_argument('--workers', type=int, default=2, help='processes reading patch-sized images')
    parser.add_argument('--tile', type=int,
                        help='pixels on a side of what the network sees: images up to this size go through whole '
                             '(padded), larger ones in tiles of this size (default: the patch size the model was '
                             f'trained on, recorded in our checkpoints; {REFERENCE_PATCH_SIZE}, the reference\'s, '
                             'for checkpoints that record none)')
    parser.add_argument('--overlap', type=int,
                        help='minimum overlap of neighbouring tiles in pixels (default: a seventh of the tile, 32 at 224)')
    parser.add_argument('--white_background', default='auto', choices=('auto', 'white', 'none'),
                        help='white non-tissue (grey > 200, specks under 50 px kept) becomes background 4: auto = for '
                             'luad and custom, not for bcss (white fat is tissue there), as the pseudo-masks')
    parser.add_argument('--output_stride', type=int, default=16, choices=(8, 16),
                        help='DeepLab output stride the checkpoint was trained with: the weights do not fix it; our '
                             'stage-2 checkpoints record it (args.out_stride), released ones do not')
    parser.add_argument('--amp', action='store_true',
                        help='the segmentation network in lower precision: bfloat16 on CUDA where supported (else '
                             'float16) and on CPUs with bfloat16 instructions (AVX512-BF16 or AMX)')
    parser.add_argument('--overwrite', action='store_true', help='redo images and slides that are finished')
    parser.add_argument('--debug', action='store_true', help='show tracebacks of input errors')
    add_slide_args(parser.add_argument_group('whole slides'))
    return parser


def add_slide_args(group):
    group.add_argument('--mpp', type=float,
                       help='um per pixel to segment at: the resolution the model was trained at (default: '
                            'recorded in our checkpoints, else by --dataset: '
                            f'{", ".join(f"{k} {d.mpp:g}" for k, d in DATASETS.items() if d.mpp)}; custom: give '
                            'it). Tiles are read from the nearest pyramid level at or finer than that and resampled')
    group.add_argument('--slide_mpp', type=float,
                       help="um per level-0 pixel of the slides, overriding their metadata (for slides without it)")
    group.add_argument('--level', type=int,
                       help='segment this pyramid level as it is, instead of resampling to --mpp')
    group.add_argument('--no_tissue_detection', action='store_true',
                       help='segment the glass too (every tile goes through the network)')
    group.add_argument('--tissue_saturation', type=int,
                       help="tissue where the thumbnail's saturation (0..255) exceeds this (default: where it "
                            "differs from the slide's own glass in colour or darkness, tool/wsi/tissue.py)")
    group.add_argument('--tissue_closing', type=float, default=CLOSING_UM,
                       help='radius (um) of the closing that joins ragged tissue; 0 turns it off')
    group.add_argument('--tissue_min_area', type=float, default=MIN_AREA_UM2,
                       help='um2: tissue specks smaller than this are dropped, holes smaller than this filled')
    group.add_argument('--geojson_tolerance', type=float, default=4.0,
                       help='um: GeoJSON polygons follow the mask sampled every this many um and are simplified '
                            'to it, all regions together as one coverage (shapely), so they never overlap')


def main(args):
    check_args(args)
    init_distributed_mode(args)
    with large_images_allowed():
        jobs = list_inputs(args.input)
        slides = [(name, path) for name, path in jobs if is_slide(path)]
        images = [job for job in jobs if job not in slides]
        truth = truth_paths(args.masks, [name for name, _ in images]) if args.masks and images else None
        device = resolve_device(args.device)
        checkpoint = load_checkpoint(args.checkpoint)
        choose_model_input(args, recorded_input(checkpoint), needs_mpp=bool(slides) and args.level is None)
        predictor = load_predictor(args, checkpoint, device, len(DATASETS[args.dataset].class_names))
        if images and is_main_process():
            segment_images(images, predictor, truth, args)
        if slides:
            write_run_record(args.out, args, name='slides_run_args.json')
            run_cohort(slides, predictor, args)


def segment_images(jobs, predictor, truth, args):
    """Patches and large images: masks/, overlays/, areas.csv and, with --masks, metrics.json."""
    class_names, palette = DATASETS[args.dataset].class_names, DATASETS[args.dataset].palette
    outputs = Outputs(args.out, palette, class_names, truth)
    whole, tiled = [], []  # images that fit in one tile, and larger ones
    for name, path in jobs:
        if outputs.finished(name) and not args.overwrite:
            outputs.record(name, read_mask(outputs.mask_path(name)))
            continue
        height, width = image_height_width(path, args.level)  # headers only
        (whole if height <= args.tile and width <= args.tile else tiled).append((name, path, (height, width)))
    with tqdm(total=len(whole) + len(tiled), unit='image', desc='infer') as bar:
        segment_whole(predictor, whole, outputs, args, bar)
        for name, path, _ in tiled:
            with open_image(path, args.level) as image:
                outputs.save(name, segment_tiled(predictor, image, args, name), image)
            bar.update()
    outputs.write_areas()
    log.info(f'{len(whole) + len(tiled)} image(s) segmented, {len(jobs) - len(whole) - len(tiled)} already '
             f'finished (kept; --overwrite redoes them) -> {args.out}')
    if truth:
        row = 'stage 2' + (f' + gate ({args.gate})' if args.stage1 else '')
        log.info(format_table({row: outputs.confusion.scores()}, class_names))
        outputs.write_metrics(row)


def check_args(args):
    if args.gate and not args.stage1:
        raise InputError('--gate: the classification gate needs the stage-1 classifier (--stage1 PATH)')
    if args.stage1 and not args.gate:
        args.gate = 'multiply'
    if args.tile is not None and args.tile < 16:
        raise InputError(f'--tile {args.tile}: at least 16 pixels (DeepLab reduces its input 16 times)')
    if args.overlap is not None and args.overlap < 0:
        raise InputError(f'--overlap {args.overlap}: must be at least 0')
    for flag, value, least in (('--batch_size', args.batch_size, 1), ('--workers', args.workers, 0),
                               ('--level', args.level, 0), ('--tissue_closing', args.tissue_closing, 0),
                               ('--tissue_min_area', args.tissue_min_area, 0)):
        if value is not None and value < least:
            raise InputError(f'{flag} {value}: must be at least {least}')
    for flag, value in (('--mpp', args.mpp), ('--slide_mpp', args.slide_mpp),
                        ('--geojson_tolerance', args.geojson_tolerance)):
        if value is not None and not value > 0:
            raise InputError(f'{flag} {value}: must be a positive number of um')
    if args.mpp is not None and args.level is not None:
        raise InputError('--mpp and --level: give one (--level segments a pyramid level as it is)')
    if args.tissue_saturation is not None and not 0 <= args.tissue_saturation <= 255:
        raise InputError(f'--tissue_saturation {args.tissue_saturation}: must lie in 0..255')


def list_inputs(path):
    """[(name, file)] of one image, of the supported images of a folder (sorted, hidden files
    left out) or of a CSV list; name = file name without extension, the name of every output."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.lower().endswith(EXTENSIONS) and not f.startswith('.')
                       and os.path.isfile(os.path.join(path, f)))
        if not files:
            raise InputError(f'{path}: no images ({" ".join(EXTENSIONS)})')
    elif os.path.isfile(path) and path.lower().endswith('.csv'):
        files = read_slide_list(path)
        for file in files:
            if not os.path.isfile(file):
                raise InputError(f'{file}: not found (listed in {path})')
            if not file.lower().endswith(EXTENSIONS):
                raise InputError(f'{file}: not a supported image type ({" ".join(EXTENSIONS)}), listed in {path}')
    elif os.path.isfile(path):
        if not path.lower().endswith(EXTENSIONS):
            raise InputError(f'{path}: not a supported image type ({" ".join(EXTENSIONS)})')
        files = [path]
    else:
        raise InputError(f'{path}: not found')
    jobs, seen = [], {}
    for file in files:
        name = os.path.splitext(os.path.basename(file))[0]
        if name in seen:
            raise InputError(f'{file}: has the same name as {seen[name]}; both would write {name}.png')
        seen[name] = file
        jobs.append((name, file))
    return jobs


def truth_paths(folder, names):
    if not os.path.isdir(folder):
        raise InputError(f'{folder}: ground-truth mask folder not found')
    paths = {name: os.path.join(folder, name + '.png') for name in names}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise InputError(f'{missing[0]}: ground-truth mask missing ({len(missing)} of {len(names)} missing)')
    return paths


def recorded_input(checkpoint):
    """What a stage-2 checkpoint of ours records of its training patches ({'patch_size': [h, w],
    'mpp': um per pixel or None}, tool.stages.stage2.training_input); {} for released and bare ones."""
    record = checkpoint.get('input') if isinstance(checkpoint, dict) else None
    return record if isinstance(record, dict) else {}


def choose_model_input(args, record, needs_mpp):
    """Settle --tile, --overlap and the resolution to segment slides at (args.model_mpp) from the
    flags and what the checkpoint records; say on one line which tile and why, and warn where a
    flag differs from what the model learnt on."""
    learnt = max(record['patch_size']) if record.get('patch_size') else None
    model_tile = learnt or REFERENCE_PATCH_SIZE
    if learnt:
        why = f'the patch size the model was trained on (recorded in {args.checkpoint})'
    else:
        why = f"the reference's patch size ({args.checkpoint} records none: a released or bare checkpoint)"
    if args.tile is None:
        args.tile = model_tile
    elif args.tile != model_tile:
        why = 'as --tile asks'
        learnt_how = 'was trained on' if learnt else "is taken to know (the reference's)"
        log.warning(f'warning: --tile {args.tile} differs from the {model_tile} px patches the model {learnt_how}: '
                    "DeepLab's image-level pooling makes every pixel depend on the input's extent, so predictions "
                    'at another size are worse')
    if args.overlap is None:
        args.overlap = round(args.tile / 7)
    if not 0 <= args.overlap < args.tile:
        raise InputError(f'--overlap {args.overlap}: must lie in 0 .. --tile - 1 ({args.tile - 1})')
    log.info(f'tiles of {args.tile} x {args.tile} px, overlap {args.overlap}: {why}')
    recorded_mpp = record.get('mpp')
    if args.mpp and recorded_mpp and abs(args.mpp - recorded_mpp) > 0.01 * recorded_mpp:
        log.warning(f'warning: --mpp {args.mpp:g} differs from the {recorded_mpp:g} um per pixel the model was '
                    'trained at')
    args.model_mpp = args.mpp or recorded_mpp or DATASETS[args.dataset].mpp
    if needs_mpp and args.model_mpp is None:
        raise InputError(f'{args.checkpoint}: the resolution the model was trained at is unknown (--dataset '
                         f'{args.dataset}, and the checkpoint records none); give --mpp (um per pixel) or --level')


def load_predictor(args, checkpoint, device, n_class):
    state_dict = extract_state_dict(checkpoint, args.checkpoint)
    segmenter = deeplab_from_state_dict(state_dict, args.output_stride, path=args.checkpoint)
    found = segmenter.state_dict()[CLASSIFIER[0]].shape[0]
    if found != n_class:
        raise InputError(f'{args.checkpoint}: predicts {found} classes, --dataset {args.dataset} has {n_class}')
    classifier = None
    if args.stage1:
        classifier = classifier_from_state_dict(read_state_dict(args.stage1), path=args.stage1)
        found = classifier.fc8.weight.shape[0]
        if found != n_class:
            raise InputError(f'{args.stage1}: classifies {found} classes, the stage-2 checkpoint {n_class}')
    return Predictor(segmenter, device, classifier, args.gate, args.gate_threshold, inference_dtype(args.amp, device),
                     white_background=uses_white_background(args.dataset, args.white_background))


def inference_dtype(amp, device):
    """The autocast dtype of the segmentation network for --amp: as training's on CUDA; on the CPU
    bfloat16 where the CPU has instructions for it (elsewhere it is emulated, and slower)."""
    if not (amp and device.type == 'cpu'):
        return autocast_dtype(amp, device)
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return torch.bfloat16
    log.info('note: --amp: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX); running in float32')
    return None


class Predictor:
    """uint8 RGB (B, H, W, 3) -> stage-2 logits (B, C, H, W) on the device, gated by the stage-1
    classifier's verdict on the same pixels when one is given. Input scaling as in training:
    RGB / 255, no mean/std. With white_background, a background channel is appended (C + 1
    channels): white non-tissue of each input (tool.method.pseudo_mask.background_mask) gets -inf for
    every class and 0 for background, everything else -inf for background, so the argmax, and the
    softmax that tiles are blended by, make white background and leave the rest to the classes."""

    def __init__(self, segmenter, device, classifier=None, gate=None, threshold=GATE_THRESHOLD, amp_dtype=None,
                 white_background=False):
        # On CUDA channels_last (also what the images already are) and cuDNN autotuning (every
        # batch has the same tile size); on the CPU plain NCHW keeps results equal to the reference's.
        self.memory_format = configure_cuda_speed(device)
        self.segmenter = segmenter.to(device, memory_format=self.memory_format).eval()
        self.classifier = None if classifier is None else classifier.to(device, memory_format=self.memory_format).eval()
        self.device, self.gate, self.threshold, self.amp_dtype = device, gate, threshold, amp_dtype
        self.white_background = white_background

    @torch.inference_mode()
    def __call__(self, rgb):
        rgb = torch.as_tensor(rgb)
        if self.device.type == 'cuda' and not rgb.is_pinned():
            rgb = rgb.pin_memory()  # lets the copy below overlap with the GPU's work
        x = rgb.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float() / 255
        x = x.contiguous(memory_format=self.memory_format)
        with autocast(self.device, self.amp_dtype):
            logits = self.segmenter(x).float()
        if self.classifier is not None:
            # The classifier runs in full precision: the 0.1 threshold on its sigmoid is sensitive.
            logits = gated_logits(logits, gate_classes(self.classifier(x), self.threshold), self.gate)
        if not self.white_background:
            return logits
        white = torch.from_numpy(np.stack([background_mask(image) for image in rgb.cpu().numpy()]))
        white = white.to(self.device)[:, None]
        background = torch.zeros_like(logits[:, :1]).masked_fill(~white, float('-inf'))
        return torch.cat([logits.masked_fill(white, float('-inf')), background], 1)


class WholeImages(torch.utils.data.Dataset):
    """Images of at most a tile, read whole in DataLoader worker processes and padded to the tile."""

    def __init__(self, paths, level, tile):
        self.paths, self.level, self.tile = paths, level, tile

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        with open_image(self.paths[index], self.level) as image:
            return index, torch.from_numpy(reflect_pad(image.read(0, image.height), self.tile, self.tile))


def segment_whole(predictor, jobs, outputs, args, bar):
    """Images of at most a tile: whole, batched, argmax of the (gated) logits as the reference; an
    image smaller than the tile is padded to it and its labels cropped back."""
    if not jobs:
        return
    names, paths, sizes = zip(*jobs)
    loader = torch.utils.data.DataLoader(
        WholeImages(paths, args.level, args.tile), batch_size=args.batch_size,
        num_workers=data_workers(args.workers), pin_memory=predictor.device.type == 'cuda')
    for indices, rgb in loader:
        labels = argmax(predictor(rgb), dim=1)
        for i, index in enumerate(indices.tolist()):
            height, width = sizes[index]
            outputs.save(names[index], labels[i, :height, :width], PixelArray(rgb[i, :height, :width].numpy()))
            bar.update()


def segment_tiled(predictor, image, args, name):
    """uint8 (H, W) labels of an image larger than a tile: blended tiles, filled strip by strip (an
    image less than a tile in one direction is padded to it there)."""
    labels = np.empty((image.height, image.width), np.uint8)
    with tqdm(total=image.height, unit='row', desc=name, leave=False) as rows:
        for y, probs in blended_rows(ReflectPadded(image, args.tile), predictor, args.tile, args.overlap,
                                     args.batch_size):
            probs = probs[:, :image.height - y, :image.width]
            labels[y:y + probs.shape[1]] = argmax(probs, dim=0)
            rows.update(probs.shape[1])
    return labels


class Outputs:
    """Writes each image's mask and overlay; keeps the class pixel counts for areas.csv and the
    confusion matrix against the ground truth for metrics.json."""

    def __init__(self, folder, palette, class_names, truth=None):
        self.folder, self.palette, self.class_names, self.truth = folder, palette, class_names, truth
        self.mask_folder = os.path.join(folder, 'masks')
        self.pixel_counts = {}
        self.confusion = ConfusionMatrix(len(class_names)) if truth else None

    def mask_path(self, name):
        return os.path.join(self.mask_folder, name + '.png')

    def overlay_path(self, name):
        return os.path.join(self.folder, 'overlays', name + '.png')

    def finished(self, name):
        # The overlay is written last, each file atomically: both present means complete.
        return os.path.isfile(self.mask_path(name)) and os.path.isfile(self.overlay_path(name))

    def save(self, name, labels, image):
        save_palette_png(labels, self.palette, self.mask_path(name))
        save_png(overlay(image, labels, self.palette), self.overlay_path(name))
        self.record(name, labels)

    def record(self, name, labels):
        self.count(name, labels)
        if self.confusion is not None:
            truth = read_mask(self.truth[name])
            if truth.shape != labels.shape:
                raise InputError(f'{self.truth[name]}: ground truth is {truth.shape[1]}x{truth.shape[0]}, '
                                 f'the image {labels.shape[1]}x{labels.shape[0]}')
            self.confusion.update(truth, labels)

    def count(self, name, labels):
        self.pixel_counts[name] = label_counts(labels)

    def write_areas(self):
        """areas.csv over every mask in masks/, earlier runs' included, so it always describes
        the folder it sits beside."""
        for file in sorted(os.listdir(self.mask_folder)):
            name = os.path.splitext(file)[0]
            if file.endswith('.png') and not file.startswith('.') and name not in self.pixel_counts:
                self.count(name, read_mask(self.mask_path(name)))
        table = io.StringIO()
        writer = csv.writer(table, lineterminator='\n')
        writer.writerow(['name', 'pixels', *self.class_names, *[c + '_pixels' for c in self.class_names]])
        for name in sorted(self.pixel_counts):
            counts = self.pixel_counts[name]
            tissue = counts[:len(self.class_names)]
            writer.writerow([name, counts.sum(), *[f'{c / counts.sum():.6f}' for c in tissue], *tissue])
        save_text(table.getvalue(), os.path.join(self.folder, 'areas.csv'))

    def write_metrics(self, row):
        scores = scores_to_json(self.confusion.scores(), self.class_names)
        record = {'prediction': row, 'images': len(self.truth), **scores}
        save_text(json.dumps(record, indent=2) + '\n', os.path.join(self.folder, 'metrics.json'))
