"""Inference speed: our predictor against the reference's test loop, in patches per second, and
whether both give the same masks.

    python -m bench.bench_infer                           # CPU, DeepLab ResNet-18 + gate, under a minute
    python -m bench.bench_infer --device cuda --backbone resnet --stage1_width 1 --patches 512 [--amp]

Both paths segment the same patches (held in memory, so that only the prediction is timed) with
the same stage-2 DeepLabV3+ and, for the classification gate, the same stage-1 ResNet-38
(--no_gate leaves it out), alternating after a warm-up; the best run of each counts.

- ours: tool.inference.infer.Predictor, as 4_infer.py runs it: --batch_size patches per forward,
  inference mode, channels_last and cuDNN autotuning on CUDA, pinned non-blocking copies,
  --amp (bf16, or fp16) for the segmentation, the gate applied on the device, one argmax read
  back as uint8 per batch.
- reference (WSSS-Tissue's 3_train_stage2.py Trainer.test, restated): batch 1 (its test
  loader), float32 NCHW, torch.no_grad; with the gate it runs the segmentation network a second
  time on the same image (its `output = self.model(image)` under `if Is_GM`) plus the stage-1
  forward_cam; logits and gate copied to the host, gated and argmax'ed in numpy.

The masks of the two paths are compared pixel by pixel; they may differ only where float
rounding (batch size, --amp) tips a near-tie.
"""
import argparse
import os
import tempfile

import numpy as np
import torch

from bench.timing import add_common_args, alternating_rates, device_name, report
from network.deeplab import BACKBONES, DeepLab
from network.resnet38_cls import CAMClassifier
from tool.core.runtime import autocast_dtype, configure_cuda_speed, resolve_device
from tool.data.patches import read_rgb
from tool.data.synth import write_dataset
from tool.inference.infer import Predictor, argmax
from tool.method.gate import GATE_THRESHOLD

MIN_AGREEMENT = 0.999  # share of identical mask pixels below which the paths disagree for real


def reference_masks(segmenter, classifier, patches, device):
    """uint8 (N, H, W) masks, one patch at a time, the way the reference's test phase does it."""
    masks = []
    for rgb in patches:
        image = torch.from_numpy(rgb.transpose(2, 0, 1)[None] / np.float32(255)).to(device)
        with torch.no_grad():
            output = segmenter(image)
            if classifier is not None:
                output = segmenter(image)
                _, logits = classifier.forward_cam(image)
                present = (torch.sigmoid(logits).cpu() > GATE_THRESHOLD)
        prediction = output.cpu().numpy()
        if classifier is not None:
            prediction = prediction * present[:, :, None, None].numpy()
        masks.append(np.argmax(prediction, axis=1)[0].astype(np.uint8))
    return np.stack(masks)


def our_masks(predictor, patches, batch_size):
    return np.concatenate([argmax(predictor(torch.from_numpy(patches[i:i + batch_size])), dim=1)
                           for i in range(0, len(patches), batch_size)])


def make_patches(n, size, seed):
    with tempfile.TemporaryDirectory() as folder:
        root = os.path.join(folder, 'synth')
        write_dataset(root, 'luad', size, {'train': 1, 'val': 1, 'test': n}, seed)
        image_dir = os.path.join(root, 'test', 'img')
        return np.stack([read_rgb(os.path.join(image_dir, name)) for name in sorted(os.listdir(image_dir))])


def main(args):
    device = resolve_device(args.device)
    if device.type == 'cpu':
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    segmenter = DeepLab(args.backbone, 16, num_classes=4).to(device).eval()
    classifier = None if args.no_gate else CAMClassifier(4, args.stage1_width).to(device).eval()
    patches = make_patches(args.patches, args.size, args.seed)
    gate = 'no gate' if args.no_gate else f'gate: ResNet-38 width {args.stage1_width:g}'
    print(f'DeepLabV3+ {args.backbone}, {gate}, {args.size} px, {len(patches)} patches, {device} ({device_name(device)}), '
          f'{"ours with --amp" if args.amp else "float32"}')

    # Predictor converts the networks to channels_last on CUDA: the reference gets its own copies.
    reference_segmenter = DeepLab(args.backbone, 16, num_classes=4).to(device).eval()
    reference_segmenter.load_state_dict(segmenter.state_dict())
    reference_classifier = None
    if classifier is not None:
        reference_classifier = CAMClassifier(4, args.stage1_width).to(device).eval()
        reference_classifier.load_state_dict(classifier.state_dict())
    predictor = Predictor(segmenter, device, classifier, None if args.no_gate else 'multiply',
                          amp_dtype=autocast_dtype(args.amp, device))

    def reference(chunk):
        torch.backends.cudnn.benchmark = False  # the reference leaves cuDNN's default
        return reference_masks(reference_segmenter, reference_classifier, chunk, device)

    def ours(chunk):
        configure_cuda_speed(device)  # cuDNN autotuning back on
        return our_masks(predictor, chunk, args.batch_size)

    masks = {}

    def run_on_all(name, path):
        masks[name] = path(patches)
        return len(patches)

    for path in (reference, ours):
        path(patches[:args.batch_size])  # warm-up
    rates = alternating_rates({'reference': lambda: run_on_all('reference', reference),
                               'ours': lambda: run_on_all('ours', ours)}, args.repeats, device)
    report(rates, 'patches/s')
    agreement = (masks['reference'] == masks['ours']).mean()
    print(f'identical mask pixels: {agreement:.6f}')
    if agreement < MIN_AGREEMENT:
        raise SystemExit(f'the paths disagree on {1 - agreement:.2%} of the pixels (more than float rounding)')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_common_args(parser, patches=16, repeats_help='runs')
    parser.add_argument('--backbone', default='resnet18', choices=BACKBONES, help="'resnet' = the reference's ResNet-101")
    parser.add_argument('--stage1_width', type=float, default=0.25, help='ResNet-38 width of the gate (1.0 = reference)')
    parser.add_argument('--no_gate', action='store_true', help='segmentation only (the reference\'s --Is_GM False)')
    parser.add_argument('--batch_size', type=int, default=16, help='our path: patches per forward (4_infer.py default)')
    return parser.parse_args(argv)


if __name__ == '__main__':
    main(parse_args())
