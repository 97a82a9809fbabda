"""DeepLabV3+ decoder: ASPP output upsampled to the low-level features (stride 4), concatenated with
their 48-channel projection, refined by two 3x3 convolutions and classified (reference layout:
`last_conv.8` is the classifier)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Decoder(nn.Module):
    def __init__(self, num_classes, low_level_channels, norm_layer):
        super().__init__()
        self.conv1 = nn.Conv2d(low_level_channels, 48, 1, bias=False)
        self.bn1 = norm_layer(48)
        self.relu = nn.ReLU()
        self.last_conv = nn.Sequential(
            nn.Conv2d(256 + 48, 256, 3, padding=1, bias=False), norm_layer(256), nn.ReLU(), nn.Dropout(0.5),
            nn.Conv2d(256, 256, 3, padding=1, bias=False), norm_layer(256), nn.ReLU(), nn.Dropout(0.1),
            nn.Conv2d(256, num_classes, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x, low_level):
        low_level = self.relu(self.bn1(self.conv1(low_level)))
        x = F.interpolate(x, size=low_level.shape[2:], mode='bilinear', align_corners=True)
        return self.last_conv(torch.cat((x, low_level), dim=1))
