"""DeepLabV3+, the stage-2 segmentation network (pytorch-deeplab-xception layout, as in WSSS-Tissue).

backbone 'resnet' is the reference's ResNet-101: its state_dict keys and shapes equal the
reference's, so released stage-2 checkpoints and `init_weights/deeplab-resnet.pth.tar` load
strictly. 'resnet50', 'resnet34', 'resnet18' and 'mobilenet' keep the same ASPP and decoder for
runs on the CPU; `width` (ResNets) scales the channels of every layer, backbone, ASPP and decoder
alike, for smaller ones still. Input: RGB / 255, no mean/std; output: logits at the input size.
"""
import os

import torch.nn as nn
import torch.nn.functional as F

from network.aspp import ASPP
from network.backbone.mobilenet import MobileNetV2
from network.backbone.resnet import RESNETS, Bottleneck, ResNet
from network.decoder import Decoder
from tool.checkpoint import extract_state_dict, load_state_dict_strict, read_state_dict
from tool.io import InputError

BACKBONES = tuple(RESNETS) + ('mobilenet',)
CLASSIFIER = ('decoder.last_conv.8.weight', 'decoder.last_conv.8.bias')


def build_backbone(name, output_stride, norm_layer, width=1.0):
    if name == 'mobilenet':
        if width != 1:
            raise ValueError('width: the mobilenet backbone has one width (1.0); use a ResNet backbone to shrink')
        return MobileNetV2(output_stride, norm_layer)
    if name in RESNETS:
        return ResNet(name, output_stride, norm_layer, width)
    raise ValueError(f'unknown backbone {name!r}, expected one of {", ".join(BACKBONES)}')


class DeepLab(nn.Module):
    """pretrained: False, or the path of ImageNet classification weights for the backbone
    (torchvision names, e.g. resnet101-5d3b4d8f.pth); nothing is ever downloaded.
    freeze_bn: every BatchNorm stays in eval mode (running statistics fixed) and its affine
    parameters are not trained. (The reference meant this, but its `freeze_bn` attribute hides
    its `freeze_bn()` method, so there only the affine parameters stayed out of the optimiser.)"""

    def __init__(self, backbone='resnet', output_stride=16, num_classes=4, sync_bn=False, freeze_bn=False,
                 pretrained=False, width=1.0):
        super().__init__()
        norm_layer = nn.SyncBatchNorm if sync_bn else nn.BatchNorm2d
        self.backbone = build_backbone(backbone, output_stride, norm_layer, width)
        head = round(256 * width)
        self.aspp = ASPP(self.backbone.out_channels, output_stride, norm_layer, head)
        self.decoder = Decoder(num_classes, self.backbone.low_level_channels, norm_layer, head)
        if pretrained:
            load_imagenet_backbone(self.backbone, pretrained)
        self.freeze_bn = freeze_bn
        if freeze_bn:
            for m in self.batchnorms():
                m.requires_grad_(False)

    def batchnorms(self):
        return [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode=True):
        super().train(mode)
        if self.freeze_bn:
            for m in self.batchnorms():
                m.eval()
        return self

    def forward(self, x):
        features, low_level = self.backbone(x)
        logits = self.decoder(self.aspp(features), low_level)
        return F.interpolate(logits, size=x.shape[2:], mode='bilinear', align_corners=True)

    def get_1x_lr_params(self):
        """Backbone parameters (base learning rate)."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def get_10x_lr_params(self):
        """ASPP and decoder parameters (10 x the base learning rate)."""
        return [p for m in (self.aspp, self.decoder) for p in m.parameters() if p.requires_grad]


def load_imagenet_backbone(backbone, path):
    """ImageNet weights into the backbone by name; keys the backbone lacks (the 1000-class head)
    are ignored, as the reference does, but every backbone tensor must come from the file."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError('pretrained must be False or the path of ImageNet backbone weights (nothing is downloaded)')
    own = backbone.state_dict()
    weights = {k: v for k, v in read_state_dict(path).items() if k in own}
    load_state_dict_strict(backbone, weights, path)


def infer_backbone(state_dict, path='checkpoint'):
    """Backbone name of a DeepLab state_dict: mobilenet keys, else ResNet block type and layer3 depth."""
    if 'backbone.features.0.0.weight' in state_dict:
        return 'mobilenet'
    is_bottleneck = 'backbone.layer1.0.conv3.weight' in state_dict
    layer3_blocks = len({k.split('.')[2] for k in state_dict if k.startswith('backbone.layer3.')})
    for name, (block, depths) in RESNETS.items():
        if (block is Bottleneck) == is_bottleneck and depths[2] == layer3_blocks:
            return name
    block_name = 'Bottleneck' if is_bottleneck else 'BasicBlock'
    raise InputError(f'{path}: not a known DeepLab backbone ({layer3_blocks} {block_name} blocks in layer3; '
                     f'known: {", ".join(BACKBONES)})')


def infer_width(state_dict):
    """The width multiplier of a DeepLab state_dict, from its ASPP's channels (256 at width 1)."""
    return state_dict['aspp.aspp1.atrous_conv.weight'].shape[0] / 256


def deeplab_from_state_dict(state_dict, output_stride=16, sync_bn=False, path='checkpoint'):
    """A DeepLab whose backbone and class count fit `state_dict` (bare, or a checkpoint dict holding
    'state_dict', 'module.' prefixes allowed), loaded strictly. The output stride is not stored in
    the weights: give it."""
    state_dict = extract_state_dict(state_dict, path)
    if CLASSIFIER[0] not in state_dict:
        raise InputError(f'{path}: not a DeepLab state_dict (no {CLASSIFIER[0]})')
    model = DeepLab(infer_backbone(state_dict, path), output_stride, num_classes=state_dict[CLASSIFIER[0]].shape[0],
                    sync_bn=sync_bn, width=infer_width(state_dict))
    return load_state_dict_strict(model, state_dict, path)


def init_deeplab_from_file(model, path):
    """Initialise `model` from a DeepLab checkpoint file such as init_weights/deeplab-resnet.pth.tar
    (VOC, 21 classes). A classifier with another class count is left out (the model keeps its own
    fresh one, as the reference deletes decoder.last_conv.8.*); every other tensor must match."""
    state_dict = read_state_dict(path)
    own = model.state_dict()
    if CLASSIFIER[0] in state_dict and state_dict[CLASSIFIER[0]].shape[0] != own[CLASSIFIER[0]].shape[0]:
        state_dict = {**state_dict, **{k: own[k] for k in CLASSIFIER}}
    return load_state_dict_strict(model, state_dict, path)
