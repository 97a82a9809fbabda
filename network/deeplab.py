"""DeepLabV3+, the stage-2 segmentation network (pytorch-deeplab-xception layout, as in WSSS-Tissue).

backbone 'resnet' is the reference's ResNet-101: its state_dict keys and shapes equal the
reference's, so released stage-2 checkpoints and `init_weights/deeplab-resnet.pth.tar` load
strictly. 'resnet50', 'resnet34', 'resnet18' and 'mobilenet' keep the same ASPP and decoder for
runs on the CPU; `width` (ResNets) scales the channels of every layer, backbone, ASPP and decoder
alike, for smaller ones still. Input: RGB / 255, no mean/std; output: logits at the input size.
"""
import torch.nn as nn
import torch.nn.functional as F

from network.aspp import ASPP
from network.backbone.mobilenet import MobileNetV2
from network.backbone.resnet import RESNETS, ResNet
from network.decoder import Decoder

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
    """freeze_bn: every BatchNorm stays in eval mode (running statistics fixed) and its affine
    parameters are not trained. (The reference meant this, but its `freeze_bn` attribute hides
    its `freeze_bn()` method, so there only the affine parameters stayed out of the optimiser.)"""

    def __init__(self, backbone='resnet', output_stride=16, num_classes=4, sync_bn=False, freeze_bn=False,
                 width=1.0):
        super().__init__()
        norm_layer = nn.SyncBatchNorm if sync_bn else nn.BatchNorm2d
        self.backbone = build_backbone(backbone, output_stride, norm_layer, width)
        head = round(256 * width)
        self.aspp = ASPP(self.backbone.out_channels, output_stride, norm_layer, head)
        self.decoder = Decoder(num_classes, self.backbone.low_level_channels, norm_layer, head)
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
