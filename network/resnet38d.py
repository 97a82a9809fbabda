"""ResNet-38 backbone (model A of Wu et al., "Wider or Deeper: Revisiting the ResNet Model for
Visual Recognition"), laid out exactly as WSSS-Tissue uses it.

Pre-activation residual blocks: each block starts with BN-ReLU on its input, and the projection
shortcut (`conv_branch1`, where the shape changes) reads that normalised input, not the raw one.
Output stride 8: b2, b3 and b4 halve the resolution; b5 to b7 keep it and dilate instead.

Module names and registration order equal the reference's, so its released checkpoints and the
converted ImageNet weights load key for key. `width` scales every channel count (1.0 = reference)
so the same network can run on a CPU; all reference counts are multiples of 64, so the model keeps
exact proportions with `conv1a` holding round(64 * width) filters.
"""
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity or 1x1-projection shortcut."""

    def __init__(self, in_channels, mid_channels, out_channels, stride=1, first_dilation=None, dilation=1):
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.same_shape = in_channels == out_channels and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, mid_channels, 3, stride, padding=first_dilation,
                                       dilation=first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = nn.Conv2d(mid_channels, out_channels, 3, padding=dilation, dilation=dilation,
                                        bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x):
        normalised = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(normalised)
        branch = self.conv_branch2a(normalised)
        branch = self.conv_branch2b1(F.relu(self.bn_branch2b1(branch)))
        return shortcut + branch


class BottleneckBlock(nn.Module):
    """BN-ReLU-conv1x1 (out/4) - BN-ReLU-dropout-conv3x3 (out/2) - BN-ReLU-dropout-conv1x1 (out),
    always with a projection shortcut (b6 and b7 both widen). Channel dropout sits right before the
    two convolutions that follow the first one, as in the reference."""

    def __init__(self, in_channels, out_channels, dilation, dropout):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, out_channels // 4, 1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_channels // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_channels // 4, out_channels // 2, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_channels // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_channels // 2, out_channels, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x):
        normalised = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(normalised)
        branch = self.conv_branch2a(normalised)
        branch = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(branch))))
        branch = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(branch))))
        return shortcut + branch


class ResNet38(nn.Module):
    # The layers in forward order; forward_layers can also return 'bn7' = ReLU(bn7(b7 output)).
    LAYERS = ('conv1a', 'b2', 'b2_1', 'b2_2', 'b3', 'b3_1', 'b3_2',
              'b4', 'b4_1', 'b4_2', 'b4_3', 'b4_4', 'b4_5', 'b5', 'b5_1', 'b5_2', 'b6', 'b7')

    def __init__(self, width=1.0, dropout_scale=1.0):
        """dropout_scale multiplies the reference's channel-dropout rates of b6 and b7 (1: theirs)."""
        super().__init__()
        unit = round(64 * width)
        if unit < 1:
            raise ValueError(f'width {width} leaves no channels')
        self.width = unit / 64

        def c(reference_channels):
            return reference_channels // 64 * unit

        self.conv1a = nn.Conv2d(3, c(64), 3, padding=1, bias=False)

        self.b2 = ResBlock(c(64), c(128), c(128), stride=2)
        self.b2_1 = ResBlock(c(128), c(128), c(128))
        self.b2_2 = ResBlock(c(128), c(128), c(128))

        self.b3 = ResBlock(c(128), c(256), c(256), stride=2)
        self.b3_1 = ResBlock(c(256), c(256), c(256))
        self.b3_2 = ResBlock(c(256), c(256), c(256))

        self.b4 = ResBlock(c(256), c(512), c(512), stride=2)
        self.b4_1 = ResBlock(c(512), c(512), c(512))
        self.b4_2 = ResBlock(c(512), c(512), c(512))
        self.b4_3 = ResBlock(c(512), c(512), c(512))
        self.b4_4 = ResBlock(c(512), c(512), c(512))
        self.b4_5 = ResBlock(c(512), c(512), c(512))

        # From here on the resolution stays at 1/8; dilation keeps the receptive field growing.
        self.b5 = ResBlock(c(512), c(512), c(1024), first_dilation=1, dilation=2)
        self.b5_1 = ResBlock(c(1024), c(512), c(1024), dilation=2)
        self.b5_2 = ResBlock(c(1024), c(512), c(1024), dilation=2)

        self.b6 = BottleneckBlock(c(1024), c(2048), dilation=4, dropout=0.3 * dropout_scale)
        self.b7 = BottleneckBlock(c(2048), c(4096), dilation=4, dropout=0.5 * dropout_scale)

        self.bn7 = nn.BatchNorm2d(c(4096))
        self.out_channels = c(4096)

    def forward(self, x):
        """Features ReLU(bn7(.)), (B, 4096 * width, H/8, W/8)."""
        return self.forward_layers(x, ())[0]

    def forward_layers(self, x, names):
        """Features and the activations of the named layers, taken from this one forward pass
        (so gradients of anything computed from the features reach them, as Grad-CAM needs).

        names: layer names from LAYERS (a layer's output) and/or 'bn7' (= the features)."""
        unknown = set(names) - set(self.LAYERS) - {'bn7'}
        if unknown:
            raise ValueError(f'unknown layer(s) {sorted(unknown)}; known: {", ".join(self.LAYERS)}, bn7')
        activations = {}
        for name in self.LAYERS:
            x = getattr(self, name)(x)
            if name in names:
                activations[name] = x
        features = F.relu(self.bn7(x))
        if 'bn7' in names:
            activations['bn7'] = features
        return features, activations
