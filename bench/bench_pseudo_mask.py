"""Pseudo-mask generation: the one-pass multi-layer Grad-CAM against the reference's procedure.

    python -m bench.bench_pseudo_mask                       # full width, 224 px, CPU, 2 threads
    python -m bench.bench_pseudo_mask --device cuda         # also patches/s at the best batch size

Both paths get the same weights and patches and end in the same pseudo-mask rule. The reference
path (tool.method.gradcam.grad_cam_reference) runs, per patch, layer and class, a full forward and a full
backward with weight gradients, at batch 1: 12 passes per patch. The fast path runs one forward
per batch, no backward for bn7 and one backward per class, activations only, down to b4_5.
Printed: seconds per patch of each, their ratio, the share of identical mask pixels, and the
multiply-accumulate counts of both, which bound the ratio that any implementation can reach.
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch
from torch import nn

from bench.timing import device_name, synchronize
from network.resnet38_cls import CAMClassifier
from tool.core.checkpoint import read_state_dict
from tool.core.models import classifier_from_state_dict
from tool.core.runtime import resolve_device
from tool.data.patches import parse_label, read_rgb
from tool.data.synth import write_dataset
from tool.method.gradcam import grad_cam_reference, multi_layer_grad_cam
from tool.method.pseudo_mask import background_mask, pseudo_mask


def make_model(args, device):
    if args.weights:
        return classifier_from_state_dict(read_state_dict(args.weights), args.weights).to(device).eval()
    torch.manual_seed(args.seed)
    model = CAMClassifier(n_class=4, width=args.width)  # frozen=True: the reference's trainable set in eval mode
    for m in model.modules():  # He init: activations of a realistic scale, as trained weights have
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
    return model.to(device).eval()


def make_patches(n, size, seed):
    """Synthetic LUAD-like patches (tissue textures, white background) and their labels."""
    with tempfile.TemporaryDirectory() as folder:
        root = os.path.join(folder, 'synth')
        write_dataset(root, 'luad', size, {'train': n, 'val': 1, 'test': 1}, seed)
        names = sorted(os.listdir(os.path.join(root, 'train')))
        rgb = np.stack([read_rgb(os.path.join(root, 'train', name)) for name in names])
    return rgb, [parse_label(name, 'luad') for name in names]


def to_input(rgb, device):
    return torch.from_numpy(rgb.transpose(0, 3, 1, 2) / np.float32(255)).to(device)


def reference_masks(model, rgb, labels, layers, device):
    """The reference's way: every (patch, layer, class) on its own."""
    images = to_input(rgb, device)
    masks = []
    for image, patch, label in zip(images, rgb, labels):
        background = background_mask(patch)
        cams = {layer: np.stack([grad_cam_reference(model, image, layer, c) for c in range(len(label))])
                for layer in layers}
        masks.append({layer: pseudo_mask(cams[layer], label, background) for layer in layers})
    return masks


def fast_masks(model, rgb, labels, layers, device, batch_size):
    masks = []
    for start in range(0, len(rgb), batch_size):
        chunk = slice(start, start + batch_size)
        cams = multi_layer_grad_cam(model, to_input(rgb[chunk], device), layers)
        cams = {layer: c.cpu().numpy() for layer, c in cams.items()}
        for i, (patch, label) in enumerate(zip(rgb[chunk], labels[chunk])):
            background = background_mask(patch)
            masks.append({layer: pseudo_mask(cams[layer][i], label, background) for layer in layers})
    return masks


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


# ---- arithmetic ----------------------------------------------------------------------------------

def conv_calls(model, run):
    """Every convolution `run()` performs on one patch: (multiply-accumulates, whether its input
    needs a gradient, whether its weight does), which is what a backward pass will cost."""
    calls = []

    def record(module, inputs, output):
        macs = output[0].numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        calls.append((macs, inputs[0].requires_grad, module.weight.requires_grad))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def arithmetic(model, image, layers, n_class):
    """Multiply-accumulates per patch: forward, one reference pass, the fast path."""
    reference = conv_calls(model, lambda: grad_cam_reference(model, image, layers[0], 0))
    forward = sum(m for m, _, _ in reference)
    input_grads = sum(m for m, needs_input_grad, _ in reference if needs_input_grad)
    weight_grads = sum(m for m, _, needs_weight_grad in reference if needs_weight_grad)
    # Frozen for this count, so that exactly the convolutions above the lowest Grad-CAM layer
    # (those the class backwards pass through) see an input that needs a gradient.
    trainable = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    fast = conv_calls(model, lambda: multi_layer_grad_cam(model, image[None], layers))
    for p, flag in zip(model.parameters(), trainable):
        p.requires_grad_(flag)
    class_backward = sum(m for m, needs_input_grad, _ in fast if needs_input_grad)
    n_backprop = sum(layer != 'bn7' for layer in layers)
    return {'forward': forward, 'input_grads': input_grads, 'weight_grads': weight_grads,
            'reference': len(layers) * n_class * (forward + input_grads + weight_grads),
            'class_backward': class_backward,
            'fast': forward + (n_class * class_backward if n_backprop else 0)}


def giga(macs):
    return f'{macs / 1e9:.1f} G' if macs < 1e12 else f'{macs / 1e12:.2f} T'


# ---- main ----------------------------------------------------------------------------------------

def main(args):
    device = resolve_device(args.device)
    if device.type == 'cpu':
        torch.set_num_threads(args.threads)
    layers = args.layers.split(',')
    model = make_model(args, device)
    n_class = model.fc8.weight.shape[0]
    rgb, labels = make_patches(args.patches, args.size, args.seed)
    print(f'ResNet-38 width {model.width:g}, {args.size} px, {args.patches} patches, layers {",".join(layers)}, '
          f'{device} ({device_name(device)}), float32')

    fast_masks(model, rgb[:1], labels[:1], layers, device, 1)  # warm-up: kernel selection, allocations
    fast_seconds, fast = timed(lambda: fast_masks(model, rgb, labels, layers, device, args.batch_size), device)
    slow_seconds, slow = timed(lambda: reference_masks(model, rgb, labels, layers, device), device)
    fast_per_patch, slow_per_patch = fast_seconds / args.patches, slow_seconds / args.patches
    passes = len(layers) * n_class
    print(f'{"reference procedure, batch 1":<30}{slow_per_patch:9.2f} s/patch  ({passes} x forward + full backward)')
    print(f'{f"fast path, batch {args.batch_size}":<30}{fast_per_patch:9.2f} s/patch  '
          f'(1 forward, {n_class} class backwards of the activations)')
    ratio = slow_per_patch / fast_per_patch
    print(f'speed-up: {ratio:.1f}x')
    agreement = {layer: np.mean([(f[layer] == s[layer]).mean() for f, s in zip(fast, slow)]) for layer in layers}
    print('identical mask pixels: ' + ', '.join(f'{layer} {agree:.5f}' for layer, agree in agreement.items())
          + ('' if min(agreement.values()) == 1 else '  (the rest: near-ties that float32 rounding tips either way)'))

    macs = arithmetic(model, to_input(rgb[:1], device)[0], layers, n_class)
    bound = macs['reference'] / macs['fast']
    print(f'multiply-accumulates per patch: forward {giga(macs["forward"])}; reference {passes} x (forward + '
          f'{giga(macs["input_grads"])} input gradients + {giga(macs["weight_grads"])} weight gradients) = '
          f'{giga(macs["reference"])}; fast: forward + {n_class} x {giga(macs["class_backward"])} = '
          f'{giga(macs["fast"])} -> arithmetic bound on the speed-up: {bound:.1f}x')
    if ratio < args.target:
        print(f'below the {args.target:g}x target because the arithmetic allows about {bound:.1f}x: the forward '
              f'pass is needed once anyway, and each class needs its own vector-Jacobian product through everything '
              f'above the lowest layer (b5 to b7, {giga(macs["class_backward"])} each), since the Grad-CAM weights '
              f'are linear in the per-class gradient and no two classes share one. What the reference wastes beyond '
              f'that (11 extra forwards, weight gradients, backward below b4_5) is all removed.')

    if device.type == 'cuda':
        best = max(cuda_throughput(model, rgb, labels, layers, device, b) for b in args.cuda_batch_sizes)
        print(f'CUDA: best {best[0]:.1f} patches/s at batch {best[1]} (Grad-CAM, masks and copies included)')


def cuda_throughput(model, rgb, labels, layers, device, batch_size):
    reps = max(1, -(-2 * batch_size // len(rgb)))  # at least two batches of the largest size
    patches, patch_labels = np.concatenate([rgb] * reps), labels * reps
    try:
        fast_masks(model, patches[:batch_size], patch_labels[:batch_size], layers, device, batch_size)
        seconds, _ = timed(lambda: fast_masks(model, patches, patch_labels, layers, device, batch_size), device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return 0.0, batch_size
    rate = len(patches) / seconds
    print(f'  batch {batch_size:3d}: {rate:7.1f} patches/s')
    return rate, batch_size


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--patches', type=int, default=2, help='patches for both paths (the reference path takes '
                                                               'minutes per patch on a CPU)')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--width', type=float, default=1.0, help='ResNet-38 width (1.0 = reference)')
    parser.add_argument('--weights', help='a stage-1 checkpoint (default: He-initialised random weights)')
    parser.add_argument('--layers', default='b4_5,b5_2,bn7')
    parser.add_argument('--batch_size', type=int, default=2, help='fast-path batch size in the comparison')
    parser.add_argument('--device', default='cpu', help='cpu, cuda or auto')
    parser.add_argument('--threads', type=int, default=2, help='CPU threads')
    parser.add_argument('--cuda_batch_sizes', type=lambda s: [int(v) for v in s.split(',')],
                        default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument('--target', type=float, default=20, help='speed-up the fast path is expected to reach')
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args(argv)


if __name__ == '__main__':
    main(parse_args())
