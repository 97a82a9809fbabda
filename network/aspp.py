"""Atrous spatial pyramid pooling of DeepLabV3+: four dilated branches and an image-level branch,
concatenated and projected to 256 channels (pytorch-deeplab-xception layout; `channels` changes the
256 for reduced models)."""
import torch
import torch.nn as nn

DILATIONS = {16: (1, 6, 12, 18), 8: (1, 12, 24, 36)}


class ASPPBranch(nn.Module):
    def __init__(self, in_channels, kernel_size, dilation, norm_layer, channels):
        super().__init__()
        padding = 0 if kernel_size == 1 else dilation
        self.atrous_conv = nn.Conv2d(in_channels, channels, kernel_size, padding=padding, dilation=dilation, bias=False)
        self.bn = norm_layer(channels)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.atrous_conv(x)))


class ASPP(nn.Module):
    def __init__(self, in_channels, output_stride, norm_layer, channels=256):
        super().__init__()
        if output_stride not in DILATIONS:
            raise ValueError(f'output_stride must be 16 or 8, not {output_stride}')
        d1, d2, d3, d4 = DILATIONS[output_stride]
        self.aspp1 = ASPPBranch(in_channels, 1, d1, norm_layer, channels)
        self.aspp2 = ASPPBranch(in_channels, 3, d2, norm_layer, channels)
        self.aspp3 = ASPPBranch(in_channels, 3, d3, norm_layer, channels)
        self.aspp4 = ASPPBranch(in_channels, 3, d4, norm_layer, channels)
        self.global_avg_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1, bias=False),
                                             norm_layer(channels), nn.ReLU())
        self.conv1 = nn.Conv2d(5 * channels, channels, 1, bias=False)
        self.bn1 = norm_layer(channels)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        # The reference upsamples the 1x1 image-level feature bilinearly (align_corners=True),
        # which copies it to every position: the same as broadcasting it.
        pooled = self.global_avg_pool(x).expand(-1, -1, *x.shape[2:])
        x = torch.cat((self.aspp1(x), self.aspp2(x), self.aspp3(x), self.aspp4(x), pooled), dim=1)
        return self.dropout(self.relu(self.bn1(self.conv1(x))))
