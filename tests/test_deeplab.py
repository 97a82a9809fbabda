"""DeepLabV3+ (stage 2): reference layout, fixture equality, reduced backbones, checkpoint loading."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from network.deeplab import DeepLab
from tests.compat import FIXTURES, fixture_state_dict, reference_keys
from tool.core.checkpoint import load_checkpoint, load_state_dict_strict, save_checkpoint
from tool.core.errors import InputError
from tool.core.models import deeplab_from_state_dict, init_deeplab_from_file, load_imagenet_backbone

REDUCED = ('resnet50', 'resnet34', 'resnet18', 'mobilenet')


def randomise_batchnorm(model, seed=0):
    """Non-trivial running statistics, so eval-mode outputs depend on them being loaded."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def test_resnet101_keys_and_shapes_equal_the_reference():
    expected = reference_keys('stage2_deeplab_resnet101_os16')
    ours = {k: list(v.shape) for k, v in DeepLab('resnet', output_stride=16, num_classes=4).state_dict().items()}
    assert ours == expected
    assert list(ours) == list(expected)  # same order too, as torch.save writes it


def test_fixture_weights_load_strictly_and_reproduce_the_reference_prediction():
    weights = fixture_state_dict('stage2_deeplab_resnet101_os16')
    prefixed = deeplab_from_state_dict({'state_dict': {'module.' + k: v for k, v in weights.items()}})
    model = deeplab_from_state_dict({'state_dict': weights}).eval()
    assert isinstance(model.backbone.layer1[0].conv3, torch.nn.Conv2d) and len(model.backbone.layer3) == 23
    assert model.decoder.last_conv[8].out_channels == 4
    for (k, a), b in zip(model.state_dict().items(), prefixed.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, weights[k]), k

    fixtures = FIXTURES / 'luad'
    rgb = np.asarray(Image.open(fixtures / 'test' / 'img' / 'IHC-200-100.png').convert('RGB'), dtype=np.float32)
    reference = np.asarray(Image.open(fixtures / 'ref_pred' / 'IHC-200-100.png').convert('L'))
    with torch.no_grad():
        logits = model(torch.from_numpy(rgb / 255).permute(2, 0, 1)[None])
    assert logits.shape == (1, 4, 224, 224)
    np.testing.assert_array_equal(logits.argmax(1)[0].numpy(), reference)  # every pixel


@pytest.mark.parametrize('backbone', REDUCED)
def test_reduced_backbones_give_input_sized_logits_and_round_trip(backbone):
    torch.manual_seed(0)
    model = randomise_batchnorm(DeepLab(backbone, num_classes=3)).eval()
    x = torch.rand(1, 3, 200, 176)
    with torch.no_grad():
        logits = model(x)
        assert model(torch.rand(1, 3, 224, 224)).shape == (1, 3, 224, 224)
    assert logits.shape == (1, 3, 200, 176)

    rebuilt = deeplab_from_state_dict(model.state_dict()).eval()
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in model.modules()]
    with torch.no_grad():
        assert torch.equal(rebuilt(x), logits)


@pytest.mark.parametrize('backbone', ('resnet18', 'mobilenet'))
def test_output_stride_sets_the_feature_resolution(backbone):
    x = torch.rand(1, 3, 128, 128)
    for output_stride in (16, 8):
        model = DeepLab(backbone, output_stride=output_stride).eval()
        with torch.no_grad():
            features, low_level = model.backbone(x)
            assert model(x).shape == (1, 4, 128, 128)
        assert features.shape[2:] == (128 // output_stride,) * 2
        assert low_level.shape[1:] == (model.backbone.low_level_channels, 32, 32)


def test_a_checkpoint_with_another_class_count_is_refused_with_a_diff():
    five_classes = DeepLab('resnet18', num_classes=5).state_dict()
    with pytest.raises(InputError) as e:
        load_state_dict_strict(DeepLab('resnet18', num_classes=4), five_classes, 'five.pth')
    message = str(e.value)
    assert '\n' not in message and message.startswith('five.pth: does not match the model')
    assert 'decoder.last_conv.8.weight: model [4, 256, 1, 1], checkpoint [5, 256, 1, 1]' in message
    assert 'decoder.last_conv.8.bias: model [4], checkpoint [5]' in message


def test_unknown_backbone_in_a_state_dict_is_an_input_error():
    state_dict = DeepLab('resnet18').state_dict()
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith('backbone.layer3.1.')}
    with pytest.raises(InputError, match=r'x.pth: not a known DeepLab backbone \(1 BasicBlock blocks in layer3'):
        deeplab_from_state_dict(state_dict, path='x.pth')


def write_init_file(path, state_dict, numpy_1_names=False):
    """A DeepLab init file as pytorch-deeplab-xception saved it: numpy scalars beside the weights.
    numpy_1_names: the legacy torch format with the pickle names numpy 1.x wrote."""
    checkpoint = {'state_dict': state_dict, 'optimizer': {'state': {}, 'param_groups': [{'lr': 0.007}]},
                  'epoch': np.int64(47), 'best_pred': np.float64(0.7835)}
    if not numpy_1_names:
        save_checkpoint(checkpoint, path)
        return
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    raw = Path(path).read_bytes()
    assert raw.count(b'numpy._core.multiarray\nscalar') == 1
    Path(path).write_bytes(raw.replace(b'numpy._core.multiarray\nscalar', b'numpy.core.multiarray\nscalar'))


@pytest.mark.parametrize('numpy_1_names', (False, True))
def test_init_file_drops_a_classifier_of_another_class_count(tmp_path, numpy_1_names):
    torch.manual_seed(0)
    voc = DeepLab('resnet18', num_classes=21).state_dict()
    path = tmp_path / 'deeplab-resnet.pth.tar'
    write_init_file(path, voc, numpy_1_names)
    checkpoint = load_checkpoint(path)
    assert checkpoint['epoch'] == 47 and checkpoint['best_pred'] == pytest.approx(0.7835)

    model = DeepLab('resnet18', num_classes=4)
    fresh_classifier = model.decoder.last_conv[8].weight.detach().clone()
    init_deeplab_from_file(model, path)
    for k, v in model.state_dict().items():
        if k.startswith('decoder.last_conv.8.'):
            continue
        assert torch.equal(v, voc[k]), k
    assert torch.equal(model.decoder.last_conv[8].weight, fresh_classifier)


def test_init_file_with_the_same_classes_loads_everything_and_rejects_another_backbone(tmp_path):
    torch.manual_seed(0)
    trained = DeepLab('resnet18', num_classes=4).state_dict()
    path = tmp_path / 'init.pth'
    write_init_file(path, {'module.' + k: v for k, v in trained.items()})
    model = init_deeplab_from_file(DeepLab('resnet18', num_classes=4), path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k
    with pytest.raises(InputError, match='init.pth: does not match the model: .*missing: backbone.layer1.0.conv3'):
        init_deeplab_from_file(DeepLab('resnet50', num_classes=4), path)


def test_imagenet_backbone_weights_load_by_torchvision_names(tmp_path):
    torchvision = pytest.importorskip('torchvision')
    imagenet = torchvision.models.resnet34().state_dict()  # has fc.*, which DeepLab lacks
    path = tmp_path / 'resnet34.pth'
    save_checkpoint(imagenet, path)
    model = DeepLab('resnet34')
    load_imagenet_backbone(model.backbone, str(path))
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, imagenet[k]), k


def test_learning_rate_groups_split_backbone_from_head():
    model = DeepLab('resnet18')
    backbone, head = model.get_1x_lr_params(), model.get_10x_lr_params()
    assert {id(p) for p in backbone} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in head} == {id(p) for p in model.aspp.parameters()} | {id(p) for p in model.decoder.parameters()}
    assert len(backbone) + len(head) == len(list(model.parameters()))


def test_freeze_bn_keeps_statistics_and_affine_parameters_fixed():
    torch.manual_seed(0)
    model = DeepLab('resnet18', freeze_bn=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.rand(2, 3, 64, 64)).sum().backward()
    assert all(not m.training for m in model.batchnorms())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # running stats untouched
    trainable = {id(p) for p in model.get_1x_lr_params() + model.get_10x_lr_params()}
    for m in model.batchnorms():
        assert id(m.weight) not in trainable and m.weight.grad is None
    assert model.backbone.conv1.weight.grad is not None and model.decoder.last_conv[8].weight.grad is not None


def test_training_mode_updates_batchnorm_and_reaches_every_parameter():
    torch.manual_seed(0)
    model = DeepLab('mobilenet').train()
    model(torch.rand(2, 3, 64, 64)).sum().backward()
    assert all(m.training and m.num_batches_tracked.item() == 1 for m in model.batchnorms())
    assert all(p.grad is not None for p in model.parameters())


def test_sync_bn_swaps_the_normalisation_only():
    plain, synced = DeepLab('mobilenet'), DeepLab('mobilenet', sync_bn=True)
    assert all(type(m) is torch.nn.SyncBatchNorm for m in synced.batchnorms())
    assert len(synced.batchnorms()) == len(plain.batchnorms())
    assert {k: v.shape for k, v in synced.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}


def test_width_shrinks_every_layer_and_is_read_from_the_checkpoint():
    model = randomise_batchnorm(DeepLab('resnet18', 16, num_classes=4, width=0.5)).eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    full = {k: tuple(v.shape) for k, v in DeepLab('resnet18', 16, num_classes=4).state_dict().items()}
    assert shapes.keys() == full.keys()  # same layout, narrower layers
    assert shapes['backbone.conv1.weight'] == (32, 3, 7, 7) and shapes['backbone.layer4.2.conv2.weight'][0] == 256
    assert shapes['aspp.aspp2.atrous_conv.weight'] == (128, 256, 3, 3) and shapes['aspp.conv1.weight'][:2] == (128, 640)
    assert shapes['decoder.conv1.weight'][0] == 24 and shapes['decoder.last_conv.0.weight'][:2] == (128, 152)
    assert shapes['decoder.last_conv.8.weight'] == (4, 128, 1, 1)
    loaded = deeplab_from_state_dict({'state_dict': model.state_dict()}).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match='mobilenet'):
        DeepLab('mobilenet', width=0.5)
