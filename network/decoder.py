"""DeepLabV3+ decoder: ASPP output upsampled to the low-level features (stride 4), concatenated with
their 48-channel projection, refined by two 3x3 convolutions and classified (reference layout:
`last_conv.8` is the classifier). `channels` (the ASPP's, 256 in the reference) and the 48 of the
projection shrink together for reduced models."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Decoder(nn.Module):
    def __init__(self, num_classes, low_level_channels, norm_layer, channels=256):
        super().__init__()
        projected = round(48 * channels / 256)
        self.conv1 = nn.Conv2d(low_level_channels, projected, 1, bias=False)
        self.bn1 = norm_layer(projected)
        self.relu = nn.ReLU()
        self.last_conv = nn.Sequential(
            nn.Conv2d(channels + projected, channels, 3, padding=1, bias=False), norm_layer(channels), nn.ReLU(),
            nn.Dropout(0.5),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), norm_layer(channels), nn.ReLU(), nn.Dropout(0.1),
            nn.Conv2d(channels, num_classes, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x, low_level):
        low_level = self.relu(self.bn1(self.conv1(low_level)))
        x = F.interpolate(x, size=low_level.shape[2:], mode='bilinear', align_corners=True)
        return self.last_conv(torch.cat((x, low_level), dim=1))
