"""MobileNetV2 trunk of DeepLabV3+ (pytorch-deeplab-xception layout): the small CPU backbone.

Once the running stride reaches the output stride, later stages stop striding and dilate
instead. As in the reference, a stage's dilation is the rate accumulated *before* it, so the
first non-striding stage still uses dilation 1.
"""
import torch.nn as nn
import torch.nn.functional as F

# expansion t, output channels c, blocks n, stride s of each stage
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    def __init__(self, in_channels, out_channels, stride, dilation, expansion, norm_layer):
        super().__init__()
        hidden = round(in_channels * expansion)
        self.dilation = dilation
        self.use_residual = stride == 1 and in_channels == out_channels
        layers = []
        if expansion != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), norm_layer(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, padding=0, dilation=dilation, groups=hidden, bias=False),
                   norm_layer(hidden), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, out_channels, 1, bias=False), norm_layer(out_channels)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        # The reference pads the block *input* (the 3x3 convolution itself pads nothing), so the
        # border of the expanded features is ReLU6(BN(0)), not 0. Kept for equal outputs.
        d = self.dilation
        out = self.conv(F.pad(x, (d, d, d, d)))
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """forward(x) -> (high-level features, low-level features after the first 24-channel stage)."""

    def __init__(self, output_stride, norm_layer):
        super().__init__()
        features = [nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), norm_layer(32), nn.ReLU6(inplace=True))]
        in_channels, current_stride, rate = 32, 2, 1
        for expansion, channels, blocks, stage_stride in STAGES:
            if current_stride == output_stride:
                stride, dilation = 1, rate
                rate *= stage_stride
            else:
                stride, dilation = stage_stride, 1
                current_stride *= stage_stride
            for i in range(blocks):
                features.append(InvertedResidual(in_channels, channels, stride if i == 0 else 1, dilation,
                                                 expansion, norm_layer))
                in_channels = channels
        self.features = nn.Sequential(*features)
        self.low_level_channels = 24
        self.out_channels = 320
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        low_level = self.features[:4](x)
        return self.features[4:](low_level), low_level
