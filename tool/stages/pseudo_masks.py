"""Pseudo-masks of the training patches from the stage-1 classifier (2_generate_PM.py).

For every patch in <dataroot>/train and every layer in --layers, Grad-CAM of all classes
(tool/method/gradcam.py, one forward and one batched backward per batch) becomes a pseudo-mask by the
reference's rule (tool/method/pseudo_mask.py), written as a palette PNG of the same name to
<out>/PM_<layer>/ (default <dataroot>/train_PM/PM_b4_5, PM_b5_2, PM_bn7): what stage 2 trains on.

Patches that already have a mask in every requested layer are skipped (a killed run resumes
where it stopped; PNGs are written atomically, so none is ever half written), unless --overwrite.
Under torchrun each process takes every world_size-th patch and writes its own files.
When the dataset has pixel truth for its training patches (train_gt/, as the synthetic datasets
do), the pseudo-masks are scored against it: a table and <out>/pseudo_mask_metrics.json. A real
dataset has no such truth, so this is a diagnostic. What a user can measure is `--split val`: the
same rule on the val patches, each labelled with the classes in its mask as a training patch is
with the classes it holds, scored against val/mask (masks to <dataroot>/val_PM by default); the
pseudo-mask score a recipe is chosen by. With --tta d4 each patch's Grad-CAMs are the mean over its
eight rotations and mirror images, each mapped back (tool/method/dihedral.py), before the rule.
"""
import argparse
import json
import os

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from network.resnet38_cls import CAMClassifier
from tool.core.checkpoint import read_state_dict
from tool.core.distributed import all_reduce_sum, get_rank, get_world_size, init_distributed_mode, is_main_process
from tool.core.errors import InputError
from tool.core.files import save_palette_png, save_png, save_text
from tool.core.log import log
from tool.core.models import classifier_from_state_dict
from tool.core.runtime import configure_cuda_speed, data_workers, resolve_device, seed_everything, write_run_record
from tool.data.datasets import DATASETS, N_CLASS
from tool.data.patches import TissueDataset, colourise, image_to_rgb, read_mask
from tool.method.dihedral import TRANSFORMS, mean_over_symmetries
from tool.method.gradcam import multi_layer_grad_cam
from tool.method.metrics import ConfusionMatrix, format_table, scores_to_json
from tool.method.paper_layers import PAPER_LAYERS, PSEUDO_MASK_ROOT, pseudo_mask_folder
from tool.method.pseudo_mask import background_mask, normalise, pseudo_mask, uses_white_background

TRUTH_DIRS = {'train': 'train_gt', 'val': 'val/mask'}  # pixel truth of each split, under the dataset root
OUT_DIRS = {'train': PSEUDO_MASK_ROOT, 'val': 'val_PM'}
METRICS_FILE = 'pseudo_mask_metrics.json'


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description='Pseudo-masks of the training patches: Grad-CAM of the stage-1 '
                                                 'classifier at several layers', add_help=add_help)
    # The reference's flags, same meaning and defaults.
    parser.add_argument('--weights', default='checkpoints/stage1_checkpoint_trained_on_bcss.pth',
                        help='stage-1 checkpoint; its width and number of classes are read from it')
    parser.add_argument('--network', default='network.resnet38_cls', choices=['network.resnet38_cls'],
                        help='the classifier module (the reference has only this one)')
    parser.add_argument('--dataroot', default='datasets/BCSS-WSSS/', help='dataset folder holding train/')
    parser.add_argument('--dataset', default='bcss', choices=sorted(DATASETS),
                        help='label style in file names, palette, and whether white is background')
    parser.add_argument('--num_workers', default=8, type=int, help='data loading processes')
    parser.add_argument('--n_class', default=4, type=int)
    # Ours.
    parser.add_argument('--device', default='auto', help='auto (cuda when available), cpu or cuda')
    parser.add_argument('--batch_size', default=8, type=int,
                        help='patches per forward pass (the reference: 1); the masks depend on it only through '
                             'float32 rounding (a few pixels at near-ties)')
    parser.add_argument('--layers', default=','.join(PAPER_LAYERS),
                        help='comma-separated layers: ResNet-38 block names (b4_5, b5_2, b6, ...) or bn7')
    parser.add_argument('--split', default='train', choices=sorted(TRUTH_DIRS),
                        help='train: the masks stage 2 learns from; val: the same rule on the val patches, '
                             'labelled with the classes in their masks, scored against val/mask')
    parser.add_argument('--out', help='output folder (default: DATAROOT/train_PM, or DATAROOT/val_PM with --split val)')
    parser.add_argument('--background', default='auto', choices=('auto', 'white', 'none'),
                        help='background class 4 on white non-tissue: auto = white for luad and custom, '
                             'none for bcss (white fat is tissue there), as the reference')
    parser.add_argument('--labels_csv', help='labels of a --dataset custom train folder (rows file,a,b,c,d)')
    parser.add_argument('--tta', default='none', choices=tuple(TRANSFORMS),
                        help='Grad-CAMs of each patch: none = of the patch alone, as the reference; d4 = the mean '
                             'over its eight rotations and mirror images, each mapped back (8 times the work)')
    parser.add_argument('--overwrite', action='store_true', help='recompute patches whose masks already exist')
    parser.add_argument('--save_cam', action='store_true',
                        help='also write OUT/cam_vis/<patch>_<layer>.png: the patch, its pseudo-mask over it, '
                             'and the normalised Grad-CAM of each class in its label')
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--debug', action='store_true', help='show tracebacks of input errors')
    return parser


def parse_layers(text):
    layers = [name.strip() for name in text.split(',') if name.strip()]
    known = (*CAMClassifier.LAYERS, 'bn7')
    unknown = [name for name in layers if name not in known]
    if not layers or unknown or len(set(layers)) != len(layers):
        problem = f'unknown layer {unknown[0]}' if unknown else 'name each layer once'
        raise InputError(f'--layers {text}: {problem} (choose from {", ".join(known)})')
    return layers


def mask_path(out, layer, name):
    return os.path.join(out, pseudo_mask_folder(layer), name)


# ---- scores against pixel truth ----------------------------------------------------------------

class PseudoMaskScores:
    """Confusion matrices of each layer's pseudo-masks, plus two views of how the layers combine:
    their per-pixel majority vote (all different -> the last layer of --layers, bn7 by default,
    which the stage-2 loss weights most) and the share of pixels that at least one layer gets right."""

    def __init__(self, layers, n_class):
        self.layers = layers
        rows = layers + ['majority'] if len(layers) >= 3 else layers
        self.confusion = {row: ConfusionMatrix(n_class) for row in rows}
        self.n_class = n_class
        self.any_right = self.counted = self.patches = 0

    def update(self, truth, masks):
        truth = np.asarray(truth)
        for layer in self.layers:
            self.confusion[layer].update(truth, masks[layer])
        if 'majority' in self.confusion:
            self.confusion['majority'].update(truth, majority_vote([masks[layer] for layer in self.layers]))
        counted = truth < self.n_class
        right = np.any([masks[layer] == truth for layer in self.layers], axis=0)
        self.any_right += int((right & counted).sum())
        self.counted += int(counted.sum())
        self.patches += 1

    def report(self, class_names, device):
        """Sum over processes; the main process prints the table and returns the JSON record."""
        for matrix in self.confusion.values():
            matrix.reduce_across_ranks()
        any_right, counted, patches = all_reduce_sum([self.any_right, self.counted, self.patches], device)
        if not is_main_process():
            return None
        scores = {row: matrix.scores() for row, matrix in self.confusion.items()}
        names = {row: f'PM_{row}' if row in self.layers else f'majority of {len(self.layers)}' for row in scores}
        log.info(format_table({names[row]: s for row, s in scores.items()}, class_names))
        any_acc = any_right / counted if counted else None
        if any_acc is not None:
            log.info(f'pixels right in at least one layer: {any_acc:.4f} (one layer at best: '
                     f'{max(scores[layer]["acc"] for layer in self.layers):.4f})')
        record = {'patches': int(patches),
                  'layers': {layer: scores_to_json(scores[layer], class_names) for layer in self.layers},
                  'any_layer_acc': any_acc}
        if 'majority' in scores:
            record['majority'] = scores_to_json(scores['majority'], class_names)
        return record


def majority_vote(masks):
    """Per pixel the value most masks agree on (the lowest on a tie); where all differ, the last
    mask's value."""
    stack = np.stack(masks)
    votes = (stack[None] == np.arange(stack.max() + 1)[:, None, None, None]).sum(axis=1)
    winner = votes.argmax(axis=0).astype(stack.dtype)
    return np.where(votes.max(axis=0) > 1, winner, stack[-1])


# ---- pictures ----------------------------------------------------------------------------------

def jet(values):
    """OpenCV's jet colour map of (H, W) values in [0, 1] (NaN as 0): uint8 (H, W, 3) RGB, blue -> red."""
    levels = np.round(255 * np.clip(np.nan_to_num(values), 0, 1)).astype(np.uint8)
    return cv2.applyColorMap(levels, cv2.COLORMAP_JET)[..., ::-1]  # OpenCV's colours are BGR


def save_cam_picture(rgb, cams, label, mask, palette, path):
    """One strip: the patch, its pseudo-mask blended over it, each labelled class's normalised CAM."""
    blend = lambda top: ((rgb.astype(np.float32) + top) / 2).astype(np.uint8)
    normalised = normalise(cams)
    heatmaps = [blend(jet(normalised[c])) for c in np.flatnonzero(np.asarray(label) == 1)]
    save_png(np.concatenate([rgb, blend(colourise(mask, palette)), *heatmaps], axis=1), path)


# ---- main ----------------------------------------------------------------------------------------

def load_model(args, device):
    model = classifier_from_state_dict(read_state_dict(args.weights), args.weights)
    if model.fc8.weight.shape[0] != args.n_class:
        raise InputError(f'{args.weights}: the classifier has {model.fc8.weight.shape[0]} classes, '
                         f'--n_class is {args.n_class}')
    return model.to(device, memory_format=configure_cuda_speed(device)).eval()


def same_size_groups(items):
    """Patches of a batch grouped by size: a custom dataset may mix sizes, the network does not care."""
    groups = {}
    for item in items:
        groups.setdefault(tuple(item['image'].shape), []).append(item)
    return groups.values()


def main(args):
    if args.n_class != N_CLASS:
        raise InputError(f'--n_class {args.n_class}: the datasets have {N_CLASS} classes')
    if args.batch_size < 1:
        raise InputError(f'--batch_size {args.batch_size}: must be at least 1')
    layers = parse_layers(args.layers)
    init_distributed_mode(args)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    out = args.out or os.path.join(args.dataroot, OUT_DIRS[args.split])
    palette = DATASETS[args.dataset].palette
    white_is_background = uses_white_background(args.dataset, args.background)
    truth_dir = TRUTH_DIRS[args.split]
    has_truth = os.path.isdir(os.path.join(args.dataroot, truth_dir))

    model = load_model(args, device)
    dataset = TissueDataset(args.dataroot, args.split, args.dataset, labels_csv=args.labels_csv,
                            mask_dirs=[truth_dir] if has_truth else [])
    shard = range(get_rank(), len(dataset), get_world_size())
    is_done = lambda i: all(os.path.isfile(mask_path(out, layer, dataset.names[i])) for layer in layers)
    done = [] if args.overwrite else [i for i in shard if is_done(i)]
    todo = sorted(set(shard) - set(done))
    write_run_record(out, args, name='generate_pm_args.json')
    skipped = int(all_reduce_sum([len(done)], device)[0])
    log.info(f'{len(dataset)} {args.split} patches, layers {", ".join(layers)} -> {out}')
    if skipped:
        log.info(f'{skipped} patches already have every mask and are skipped (--overwrite recomputes them)')

    scores = PseudoMaskScores(layers, args.n_class) if has_truth else None
    loader = DataLoader(Subset(dataset, todo), batch_size=args.batch_size, num_workers=data_workers(args.num_workers),
                        collate_fn=list)
    for items in tqdm(loader, desc='pseudo-masks', disable=not is_main_process(), dynamic_ncols=True):
        for group in same_size_groups(items):
            images = torch.stack([item['image'] for item in group]).to(device)
            cams = mean_over_symmetries(lambda x: multi_layer_grad_cam(model, x, layers), images, TRANSFORMS[args.tta])
            cams = {layer: c.cpu().numpy() for layer, c in cams.items()}
            for i, item in enumerate(group):
                rgb = image_to_rgb(item['image'])
                background = background_mask(rgb) if white_is_background else None
                label = item['label'].numpy()
                masks = {layer: pseudo_mask(cams[layer][i], label, background) for layer in layers}
                for layer, mask in masks.items():
                    save_palette_png(mask, palette, mask_path(out, layer, item['name']))
                    if args.save_cam:
                        stem = os.path.splitext(item['name'])[0]
                        save_cam_picture(rgb, cams[layer][i], label, mask, palette,
                                         os.path.join(out, 'cam_vis', f'{stem}_{layer}.png'))
                if scores is not None:
                    scores.update(item['masks'][0].numpy(), masks)
    if scores is not None:
        for i in done:  # skipped patches are scored from the masks already on disk
            name = dataset.names[i]
            scores.update(read_mask(os.path.join(args.dataroot, truth_dir, name)),
                          {layer: read_mask(mask_path(out, layer, name)) for layer in layers})
        record = scores.report(DATASETS[args.dataset].class_names, device)
        if record is not None:
            path = os.path.join(out, METRICS_FILE)
            save_text(json.dumps({'weights': args.weights, 'dataroot': args.dataroot, 'split': args.split,
                                  'truth': truth_dir, **record}, indent=2) + '\n', path)
            log.info(f'pseudo-mask scores against {truth_dir}/: {path}')
