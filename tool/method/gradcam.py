"""Grad-CAM of the stage-1 classifier at several layers, for every class, from one forward pass.

Grad-CAM (Selvaraju et al. 2017) of class c at a layer with activation A (K channels):

    w_ck  = mean over positions of  d logit_c / d A_k
    cam_c = sum_k w_ck * A_k          (no ReLU: the reference keeps negative evidence)

then resized bilinearly to the patch. The reference recomputes a full forward and a full backward
(weight gradients included) for every (patch, layer, class): 12 passes per patch at batch 1.
The same numbers (up to float rounding) come out of far less work, because every layer's
activation lies on the graph of one forward pass and the logits are linear in the features:

- bn7: logit_c = mean over positions of fc8[c] . ReLU(bn7), so the gradient is fc8[c] / (h w)
  at every position and cam_c = conv(ReLU(bn7), fc8)[c] / (h w). No backward at all.
- inner layers (b4_5, b5_2, ...): one backward per class for the whole batch and all those
  layers together, gradients of the activations only (no weight gradients), stopping at the
  lowest requested layer: b5_2's gradient is computed on the way down to b4_5 anyway.

At full width and 224 px that is 100 G multiply-accumulates forward plus 4 x 58 G backward
(b5 to b7) = 0.33 T per patch, against the reference's 12 x (100 G + 88 G input gradients +
89 G weight gradients) = 3.3 T. About 10x less arithmetic is the limit for exact maps: the
channel weights are linear in each class's gradient, so each class needs its own backward.
bench/bench_pseudo_mask.py measures both paths.

`grad_cam_reference` keeps the reference's slow procedure as the oracle for tests and benchmarks.
"""
import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from tool.method.paper_layers import PAPER_LAYERS


# Hand-written: Grad-CAM libraries run a forward and backward per class and layer, 10x the arithmetic.
def multi_layer_grad_cam(model, images, layers=PAPER_LAYERS):
    """{layer: (B, n_class, H, W)} Grad-CAMs of every class, resized to the input size.

    model: a stage-1 classifier in eval mode (network.resnet38_cls.CAMClassifier: forward_layers, classify,
    fc8); images: (B, 3, H, W) on the model's device. All classes are returned, present or not:
    the pseudo-mask normalises over all of them. Patches do not interact (eval-mode BatchNorm),
    so the batch gives each patch exactly its own maps."""
    if model.training:
        raise ValueError('Grad-CAM needs model.eval(): dropout would make the maps random')
    backprop_layers = [name for name in layers if name != 'bn7']
    with torch.set_grad_enabled(bool(backprop_layers)), _graph_starts_at(model, backprop_layers):
        features, activations = model.forward_layers(images, layers)
        cams = {}
        if backprop_layers:
            logits = model.classify(features)
            weights = _class_weights(logits, [activations[name] for name in backprop_layers])
            for name, layer_weights in zip(backprop_layers, weights):
                cams[name] = torch.einsum('cbk,bkhw->bchw', layer_weights, activations[name].detach())
        if 'bn7' in layers:
            h, w = features.shape[2:]
            cams['bn7'] = F.conv2d(features.detach(), model.fc8.weight.detach()) / (h * w)
    return {name: F.interpolate(cams[name], size=images.shape[2:], mode='bilinear', align_corners=False)
            for name in layers}


def _class_weights(logits, activations):
    """Grad-CAM channel weights, (n_class, B, K) per activation: the mean over positions of
    d logit_c / d activation, for every class c.

    One backward per class through the shared graph; summing a class's logit over the batch
    separates, since a patch's logits depend on that patch only. (All classes in one batched
    vector-Jacobian product, is_grads_batched=True, gives the same numbers but measured ~15%
    slower on the CPU: vmap over the convolution backward.)"""
    n_class = logits.shape[1]
    weights = [[] for _ in activations]
    for c in range(n_class):
        grads = torch.autograd.grad(logits[:, c].sum(), activations, retain_graph=c + 1 < n_class)
        for per_layer, grad in zip(weights, grads):
            per_layer.append(grad.mean(dim=(2, 3)))
    return [torch.stack(per_layer) for per_layer in weights]


@contextlib.contextmanager
def _graph_starts_at(model, layer_names):
    """The output of the lowest layer to differentiate becomes a fresh leaf that requires grad:
    autograd records (and keeps in memory) only the network above it, and works even when every
    parameter is frozen."""
    lowest = next((name for name in model.LAYERS if name in layer_names), None)
    if lowest is None:
        yield
        return
    handle = getattr(model, lowest).register_forward_hook(
        lambda module, inputs, output: output.detach().requires_grad_())
    try:
        yield
    finally:
        handle.remove()


def grad_cam_reference(model, image, layer, class_index):
    """The reference's Grad-CAM of one class at one layer for one patch: np.ndarray (H, W).

    Slow on purpose, kept as the oracle: a full forward, a hook capturing the gradient of the
    layer, a full backward of the class logit that also fills the weight gradients of every
    trainable parameter (as the reference's `one_hot.backward()` does), channel weights = mean
    gradient, the weighted sum accumulated channel by channel in the model's precision, and
    OpenCV's bilinear resize. image: (3, H, W) or (1, 3, H, W). Like the reference, it needs
    trainable parameters above `layer` (a frozen=True classifier has them)."""
    import cv2  # only the oracle needs OpenCV (the reference resizes with it)

    if model.training:
        raise ValueError('Grad-CAM needs model.eval(): dropout would make the maps random')
    x = image if image.dim() == 4 else image[None]
    captured = {}
    with torch.enable_grad():
        features, activations = model.forward_layers(x, [layer])
        activation = activations[layer]
        activation.register_hook(lambda grad: captured.setdefault('grad', grad))
        logits = model.classify(features)
        model.zero_grad()
        logits[0, class_index].backward()
    grad = captured['grad'][0].cpu().numpy()
    activation = activation[0].detach().cpu().numpy()
    weights = grad.mean(axis=(1, 2))
    cam = np.zeros(activation.shape[1:], dtype=activation.dtype)
    for weight, channel in zip(weights, activation):
        cam += weight * channel
    return cv2.resize(cam, (x.shape[3], x.shape[2]), interpolation=cv2.INTER_LINEAR)
