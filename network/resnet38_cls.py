"""Stage-1 classifier: ResNet-38 features, a bias-free 1x1 classifier `fc8` on their global
average, and class activation maps from the same weights.

    model = CAMClassifier(n_class=4, width=1.0, frozen=True)
    logits = model(images, enable_pda=epoch > 2)       # training
    cams, logits = model.forward_cam(images)           # inference: CAMs at 1/8 resolution

Images are RGB scaled to [0, 1], no mean/std normalisation (the released weights expect that).
"""
import torch.nn.functional as F
from torch import nn

from network import resnet38d
from network.pda import PDA_MODES, progressive_dropout_attention

# Kept fixed by the reference when it starts from ImageNet weights (frozen=True): these first layers
# and every BatchNorm keep their ImageNet values. From random initialisation nothing may be frozen.
FROZEN_LAYERS = ('conv1a', 'b2', 'b2_1', 'b2_2')


class CAMClassifier(resnet38d.ResNet38):
    def __init__(self, n_class=4, width=1.0, frozen=True, gamma=1.0, pda_mode='reference', dropout_scale=1.0):
        super().__init__(width, dropout_scale)
        self.dropout7 = nn.Dropout2d(0.5 * dropout_scale)
        self.fc8 = nn.Conv2d(self.out_channels, n_class, 1, bias=False)
        nn.init.xavier_uniform_(self.fc8.weight)
        self.gamma = gamma  # PDA threshold, updated by the training loop with pda.next_gamma
        if pda_mode not in PDA_MODES:
            raise ValueError(f'pda_mode {pda_mode!r}: expected one of {PDA_MODES}')
        self.pda_mode = pda_mode  # how the PDA map re-weights the features (network/pda.py)
        self.frozen = frozen
        if frozen:
            for name in FROZEN_LAYERS:
                getattr(self, name).requires_grad_(False)
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.requires_grad_(False)
        self.train()

    def train(self, mode=True):
        """As nn.Module.train, but with frozen=True every BatchNorm stays in eval mode (running
        statistics fixed) while the dropouts follow `mode`."""
        super().train(mode)
        if self.frozen:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x, enable_pda=False):
        """Logits (B, n_class). In train mode Dropout2d(0.5) drops feature channels before the
        pooling; with enable_pda the features are first re-weighted by PDA at self.gamma."""
        features = super().forward(x)
        if enable_pda:
            features = progressive_dropout_attention(features, self.fc8.weight, self.gamma, self.pda_mode)
        return self.classify(self.dropout7(features))

    def classify(self, features):
        """Logits (B, n_class) from features (B, K, h, w): global average pool, then fc8."""
        pooled = F.avg_pool2d(features, kernel_size=features.shape[2:])
        return self.fc8(pooled).flatten(1)

    def forward_cam(self, x):
        """(cams (B, n_class, h, w) = ReLU(fc8 applied at every position), logits (B, n_class)),
        both from one pass without dropout, as the reference's Net_CAM computes them."""
        features = super().forward(x)
        cams = F.relu(F.conv2d(features, self.fc8.weight))
        return cams, self.classify(features)

    def parameter_groups(self):
        """The reference's four SGD groups: backbone weights (lr, wd), backbone biases (2 lr, no
        wd), fc8 weight (10 lr, wd), fc8 bias (20 lr, no wd). Frozen parameters are left out.

        The reference collects convolutions only: with frozen BatchNorm that is every trainable
        parameter. With frozen=False the BatchNorm scales and shifts train too, so they join the
        backbone weights and biases respectively."""
        groups = ([], [], [], [])
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                scratch = m is self.fc8
                if m.weight.requires_grad:
                    groups[2 if scratch else 0].append(m.weight)
                if m.bias is not None and m.bias.requires_grad:
                    groups[3 if scratch else 1].append(m.bias)
        return groups
