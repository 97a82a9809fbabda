"""ResNet trunk of DeepLabV3+ (pytorch-deeplab-xception layout, as used by WSSS-Tissue stage 2).

Strides are traded for dilation so that layer4 sees the image at 1/16 (or 1/8), and layer4 always
has three blocks with multi-grid dilations (1, 2, 4) x its base dilation, whatever the depth of
layers 1-3. Module names follow torchvision's ResNet, so ImageNet weights load by name.
"""
import torch.nn as nn

MULTI_GRID = (1, 2, 4)

# (stride, dilation) of layer1..layer4 for each output stride.
LAYER_GEOMETRY = {
    16: ((1, 1), (2, 1), (2, 1), (1, 2)),
    8: ((1, 1), (2, 1), (1, 2), (1, 4)),
}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels, planes, stride, dilation, downsample, norm_layer):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm_layer(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34); both take the block's dilation."""
    expansion = 1

    def __init__(self, in_channels, planes, stride, dilation, downsample, norm_layer):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


# name -> (block, number of blocks in layer1..layer3); 'resnet' is the reference's ResNet-101.
RESNETS = {
    'resnet': (Bottleneck, (3, 4, 23)),
    'resnet50': (Bottleneck, (3, 4, 6)),
    'resnet34': (BasicBlock, (3, 4, 6)),
    'resnet18': (BasicBlock, (2, 2, 2)),
}


def make_layer(block, in_channels, planes, stride, dilations, norm_layer):
    """One stage: a block per entry of `dilations`; the first one strides and projects the identity."""
    out_channels = planes * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                   norm_layer(out_channels))
    blocks = [block(in_channels, planes, stride, dilations[0], downsample, norm_layer)]
    blocks += [block(out_channels, planes, 1, dilation, None, norm_layer) for dilation in dilations[1:]]
    return nn.Sequential(*blocks)


class ResNet(nn.Module):
    """forward(x) -> (layer4 features, layer1 features): the ASPP input and the decoder's low-level input.
    width scales every layer's channels (1.0: the reference's; smaller for CPU runs)."""

    def __init__(self, name, output_stride, norm_layer, width=1.0):
        super().__init__()
        if output_stride not in LAYER_GEOMETRY:
            raise ValueError(f'output_stride must be 16 or 8, not {output_stride}')
        block, depths = RESNETS[name]
        (s1, d1), (s2, d2), (s3, d3), (s4, d4) = LAYER_GEOMETRY[output_stride]
        c = [round(channels * width) for channels in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, c[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(c[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        e = block.expansion
        self.layer1 = make_layer(block, c[0], c[0], s1, [d1] * depths[0], norm_layer)
        self.layer2 = make_layer(block, c[0] * e, c[1], s2, [d2] * depths[1], norm_layer)
        self.layer3 = make_layer(block, c[1] * e, c[2], s3, [d3] * depths[2], norm_layer)
        self.layer4 = make_layer(block, c[2] * e, c[3], s4, [g * d4 for g in MULTI_GRID], norm_layer)
        self.low_level_channels = c[0] * e
        self.out_channels = c[3] * e
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # the reference draws N(0, 2 / (k*k*out_channels))
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low_level = self.layer1(x)
        x = self.layer4(self.layer3(self.layer2(low_level)))
        return x, low_level
