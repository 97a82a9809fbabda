"""The project's models built from checkpoints: the architecture is read from the tensors, so a
bare released state_dict just loads; weights load strictly, and any mismatch is one InputError
line naming the file and the diff.

    classifier = classifier_from_state_dict(read_state_dict(path), path)    # stage 1
    segmenter = deeplab_from_state_dict(read_state_dict(path), path=path)   # stage 2
"""
import torch

from network.backbone.resnet import Bottleneck, RESNETS
from network.deeplab import BACKBONES, CLASSIFIER, DeepLab
from network.resnet38_cls import CAMClassifier
from tool.core.checkpoint import extract_state_dict, load_state_dict_strict, read_state_dict, state_dict_diff
from tool.core.errors import InputError


def built_aside(make_model):
    """make_model() without a draw from the global random stream: a model about to be overwritten
    by its checkpoint must not move the draws that come after it (stage 2's own initialisation
    and shuffles would otherwise depend on whether the gate's classifier was loaded first)."""
    with torch.random.fork_rng(devices=[]):
        return make_model()


# ---- stage 1: the ResNet-38 CAM classifier ---------------------------------------------------------

def classifier_from_state_dict(state_dict, path='checkpoint', **kwargs):
    """A CAMClassifier whose width and n_class fit `state_dict` (bare, 'module.'-prefixed or inside
    {'state_dict': ...}), loaded strictly. kwargs: frozen, gamma, pda_mode, dropout_scale."""
    state_dict = extract_state_dict(state_dict, path)
    for key in ('conv1a.weight', 'fc8.weight'):
        if key not in state_dict:
            raise InputError(f'{path}: not a stage-1 ResNet-38 classifier (no {key})')
    width = state_dict['conv1a.weight'].shape[0] / 64
    n_class = state_dict['fc8.weight'].shape[0]
    model = built_aside(lambda: CAMClassifier(n_class=n_class, width=width, **kwargs))
    return load_state_dict_strict(model, state_dict, path)


def load_classifier_backbone(model, state_dict, path='checkpoint'):
    """Load backbone weights (e.g. the converted ImageNet ResNet-38) into a CAMClassifier: every
    backbone key must match, fc8 must be absent and keeps its initialisation."""
    state_dict = extract_state_dict(state_dict, path)
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith('fc8.')}
    diff = state_dict_diff(backbone, state_dict)
    if diff:
        raise InputError(f'{path}: does not match the ResNet-38 backbone: {diff}')
    model.load_state_dict(state_dict, strict=False)
    return model


# ---- stage 2: DeepLabV3+ ---------------------------------------------------------------------------

def load_imagenet_backbone(backbone, path):
    """ImageNet classification weights (torchvision names, e.g. resnet101-5d3b4d8f.pth; nothing is
    ever downloaded) into a DeepLab's backbone by name; keys the backbone lacks (the 1000-class
    head) are ignored, as the reference does, but every backbone tensor must come from the file."""
    own = backbone.state_dict()
    weights = {k: v for k, v in read_state_dict(path).items() if k in own}
    load_state_dict_strict(backbone, weights, path)


def deeplab_backbone(state_dict, path='checkpoint'):
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


def deeplab_width(state_dict):
    """The width multiplier of a DeepLab state_dict, from its ASPP's channels (256 at width 1)."""
    return state_dict['aspp.aspp1.atrous_conv.weight'].shape[0] / 256


def deeplab_from_state_dict(state_dict, output_stride=16, sync_bn=False, path='checkpoint'):
    """A DeepLab whose backbone and class count fit `state_dict` (bare, or a checkpoint dict holding
    'state_dict', 'module.' prefixes allowed), loaded strictly. The output stride is not stored in
    the weights: give it."""
    state_dict = extract_state_dict(state_dict, path)
    if CLASSIFIER[0] not in state_dict:
        raise InputError(f'{path}: not a DeepLab state_dict (no {CLASSIFIER[0]})')
    backbone, width = deeplab_backbone(state_dict, path), deeplab_width(state_dict)
    n_class = state_dict[CLASSIFIER[0]].shape[0]
    model = built_aside(lambda: DeepLab(backbone, output_stride, num_classes=n_class, sync_bn=sync_bn, width=width))
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
