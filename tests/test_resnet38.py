"""Stage-1 network: reference layout, reference numbers, CAMs, PDA, freezing, loading."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from network import resnet38d
from network.pda import next_gamma, progressive_dropout_attention
from network.resnet38_cls import CAMClassifier, FROZEN_LAYERS
from tests.compat import FIXTURES, fixture_state_dict, reference_keys
from tool.core.checkpoint import read_state_dict, save_checkpoint
from tool.core.errors import InputError
from tool.core.models import classifier_from_state_dict, load_classifier_backbone

PATCHES = ('IHC-0-0-[1 0 0 1]', 'IHC-288-200-[1 0 1 1]')


def manifest():
    return reference_keys('stage1_resnet38_cls')


def shapes(model):
    return [(k, list(v.shape)) for k, v in model.state_dict().items()]


@pytest.fixture(scope='module')
def reference_weights():
    return fixture_state_dict('stage1_resnet38_cls')


@pytest.fixture(scope='module')
def reference_model(reference_weights):
    return classifier_from_state_dict(reference_weights).eval()


def read_patch(name):
    rgb = np.asarray(Image.open(FIXTURES / 'luad' / 'train' / f'{name}.png').convert('RGB'))
    return torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)[None]


def small_net(**kwargs):
    torch.manual_seed(0)
    return CAMClassifier(width=0.125, **kwargs)


def test_full_width_keys_and_shapes_equal_the_reference():
    with torch.device('meta'):  # shapes only
        model = CAMClassifier(n_class=4, width=1.0)
    assert shapes(model) == [(k, v) for k, v in manifest().items()]


def test_reduced_width_keeps_names_and_scales_channels():
    with torch.device('meta'):
        model = CAMClassifier(n_class=4, width=0.125)
    expected = []
    for key, shape in manifest().items():
        fixed = {'conv1a.weight': 1, 'fc8.weight': 0}.get(key)  # RGB input, class count
        expected.append((key, [d // 8 if i < 2 and i != fixed else d for i, d in enumerate(shape)]))
    assert shapes(model) == expected
    assert model.width == 0.125 and model.out_channels == 512


def test_reference_weights_load_strictly_in_every_wrapping(reference_weights):
    prefixed = {'module.' + k: v for k, v in reference_weights.items()}
    for wrapped in (reference_weights, prefixed, {'state_dict': reference_weights}):
        model = classifier_from_state_dict(wrapped)
        assert (model.width, model.fc8.out_channels) == (1.0, 4)
        assert torch.equal(model.b4_5.conv_branch2a.weight, reference_weights['b4_5.conv_branch2a.weight'])
        assert torch.equal(model.bn7.running_var, reference_weights['bn7.running_var'])


@pytest.mark.slow
def test_cams_and_logits_equal_the_reference(reference_model):
    reference = np.load(FIXTURES / 'luad' / 'ref_stage1.npz')
    for name in PATCHES:
        with torch.no_grad():
            cams, logits = reference_model.forward_cam(read_patch(name))
        ours = {'cam': cams[0], 'logits': logits[0], 'prob': torch.sigmoid(logits[0])}
        for what, value in ours.items():
            expected = reference[f'{name}|{what}']
            # random fixture weights make activations in the thousands: float32 rounding over
            # 38 layers gives about 1e-5 of that
            np.testing.assert_allclose(value.numpy(), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.slow
def test_layer_activations_give_the_reference_gradcam(reference_model):
    """forward_layers exposes exactly the activations the reference's Grad-CAM used."""
    reference = np.load(FIXTURES / 'luad' / 'ref_stage1.npz')
    name, layers = PATCHES[1], ('b4_5', 'b5_2', 'bn7')
    features, activations = reference_model.forward_layers(read_patch(name), layers)
    logits = reference_model.classify(features)
    for c in range(4):
        grads = torch.autograd.grad(logits[0, c], [activations[n] for n in layers], retain_graph=True)
        for layer, grad in zip(layers, grads):
            cam = (grad.mean((2, 3), keepdim=True) * activations[layer]).sum(1, keepdim=True)
            cam = F.interpolate(cam, size=(224, 224), mode='bilinear', align_corners=False)[0, 0]
            expected = reference[f'{name}|gradcam_{layer}'][c]
            # the reference resized with OpenCV: same bilinear rule, its own rounding
            np.testing.assert_allclose(cam.detach().numpy(), expected, rtol=0, atol=5e-4 * np.abs(expected).max())


def test_forward_layers_returns_block_outputs_from_one_pass():
    model = small_net().eval()
    x = torch.rand(2, 3, 64, 64)
    features, activations = model.forward_layers(x, ('b4_5', 'b5_2', 'bn7'))
    assert set(activations) == {'b4_5', 'b5_2', 'bn7'}
    assert features.shape == (2, 512, 8, 8)  # output stride 8
    assert activations['bn7'] is features
    with torch.no_grad():
        chained = x
        for name in resnet38d.ResNet38.LAYERS[:resnet38d.ResNet38.LAYERS.index('b4_5') + 1]:
            chained = getattr(model, name)(chained)
    assert torch.allclose(activations['b4_5'], chained, atol=1e-6)
    assert torch.equal(model.forward_layers(x, ())[0], features)
    grad, = torch.autograd.grad(model.classify(features)[:, 1].sum(), activations['b4_5'])
    assert grad.abs().sum() > 0
    with pytest.raises(ValueError, match='b9'):
        model.forward_layers(x, ('b9',))


def test_cams_are_fc8_applied_at_every_position():
    model = small_net(n_class=3).eval()
    x = torch.rand(2, 3, 48, 64)
    with torch.no_grad():
        cams, logits = model.forward_cam(x)
        features = model.forward_layers(x, ())[0]
    weight = model.fc8.weight[:, :, 0, 0]
    expected_cams = torch.einsum('bkhw,ck->bchw', features, weight).relu()
    assert cams.shape == (2, 3, 6, 8)
    assert torch.allclose(cams, expected_cams, atol=1e-5)
    assert torch.allclose(logits, features.mean((2, 3)) @ weight.T, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(model(x), logits, atol=1e-6)  # eval: dropout is identity, same logits


def loop_pda(features, weight, gamma):
    """PDA written plainly, one image and one class at a time."""
    n_class = weight.shape[0]
    out = torch.empty_like(features)
    for b in range(features.shape[0]):
        attention = torch.zeros(features.shape[2:])
        for c in range(n_class):
            cam = torch.relu((weight[c, :, 0, 0, None, None] * features[b]).sum(0))
            attention += torch.where(cam > gamma * cam.max(), 0.0, cam) / n_class
        out[b] = features[b] * attention
    return out


@pytest.mark.parametrize('gamma', [1.0, 0.9, 0.6, 0.0])
@pytest.mark.parametrize('n_class', [4, 3])
def test_pda_equals_a_plain_loop(gamma, n_class):
    torch.manual_seed(1)
    features, weight = torch.rand(3, 16, 5, 7), torch.randn(n_class, 16, 1, 1)
    assert torch.allclose(progressive_dropout_attention(features, weight, gamma),
                          loop_pda(features, weight, gamma), atol=1e-6)


def test_pda_keeps_the_peak_at_gamma_one_and_is_not_detached():
    torch.manual_seed(2)
    features = torch.rand(2, 8, 4, 4, requires_grad=True)
    weight = torch.randn(4, 8, 1, 1, requires_grad=True)
    out = progressive_dropout_attention(features, weight, 1.0)
    mean_cam = F.relu(F.conv2d(features, weight)).mean(1, keepdim=True)
    assert torch.allclose(out, features * mean_cam)  # strict '>': nothing dropped at gamma 1
    out.sum().backward()
    assert weight.grad.abs().sum() > 0 and features.grad.abs().sum() > 0


def test_forward_with_pda_reweights_the_features():
    model = small_net().eval()
    model.gamma = 0.7
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_layers(x, ())[0]
        expected = model.classify(progressive_dropout_attention(features, model.fc8.weight, 0.7))
        assert torch.allclose(model(x, enable_pda=True), expected, atol=1e-6)


def test_next_gamma_shrinks_two_percent_while_above_065():
    assert next_gamma(1.0) == 0.98
    assert next_gamma(0.66) == pytest.approx(0.6468)
    assert next_gamma(0.65) == 0.65 and next_gamma(0.6468) == 0.6468
    gamma = 1.0
    for _ in range(30):
        gamma = next_gamma(gamma)
    assert gamma == pytest.approx(0.98 ** 22)  # 0.98**21 = 0.654 is the last value above 0.65


def bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if 'running' in k or 'num_batches' in k}


def test_frozen_model_keeps_stem_and_batchnorm_fixed_in_train_mode():
    model = small_net(frozen=True)
    model.eval().train()
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert model.training and not any(m.training for m in batchnorms)
    assert model.b6.dropout_2b1.training and model.dropout7.training
    before = bn_state(model)
    F.multilabel_soft_margin_loss(model(torch.rand(2, 3, 64, 64), enable_pda=True),
                                  torch.tensor([[1., 0, 0, 1], [0, 1, 1, 0]])).backward()
    after = bn_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    frozen = {id(p) for name in FROZEN_LAYERS for p in getattr(model, name).parameters()}
    frozen |= {id(p) for m in batchnorms for p in m.parameters()}
    for name, p in model.named_parameters():
        if id(p) in frozen:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_unfrozen_model_trains_everything():
    model = small_net(frozen=False).train()
    before = bn_state(model)
    model(torch.rand(2, 3, 64, 64)).sum().backward()
    after = bn_state(model)
    assert all(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert not torch.equal(before['b2.bn_branch2a.running_mean'], after['b2.bn_branch2a.running_mean'])
    assert not torch.equal(before['bn7.running_var'], after['bn7.running_var'])
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('frozen', [True, False])
def test_parameter_groups_hold_each_trainable_parameter_once(frozen):
    model = small_net(frozen=frozen)
    groups = model.parameter_groups()
    grouped = [id(p) for group in groups for p in group]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert groups[2] == [model.fc8.weight] and groups[3] == []
    batchnorm_biases = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [id(p) for p in groups[1]] == ([] if frozen else [id(p) for p in batchnorm_biases])
    assert (id(model.conv1a.weight) in map(id, groups[0])) != frozen


def test_from_state_dict_infers_width_and_classes(tmp_path):
    saved = CAMClassifier(n_class=3, width=0.25)
    save_checkpoint(saved.state_dict(), tmp_path / 'stage1.pth')
    model = classifier_from_state_dict(read_state_dict(tmp_path / 'stage1.pth'), frozen=False)
    assert (model.width, model.fc8.out_channels, model.frozen) == (0.25, 3, False)
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in model.state_dict().items())
    broken = dict(saved.state_dict())
    del broken['b5_1.conv_branch2a.weight']
    with pytest.raises(InputError, match=r'stage1\.pth: .*missing: b5_1\.conv_branch2a\.weight'):
        classifier_from_state_dict(broken, path='stage1.pth')
    with pytest.raises(InputError, match='no fc8.weight'):
        classifier_from_state_dict({k: v for k, v in broken.items() if k != 'fc8.weight'}, path='stage1.pth')


def test_load_backbone_leaves_fc8_at_init():
    backbone = resnet38d.ResNet38(width=0.125).state_dict()
    model = small_net()
    fc8 = model.fc8.weight.clone()
    load_classifier_backbone(model, backbone)
    assert torch.equal(model.fc8.weight, fc8)
    assert torch.equal(model.b7.conv_branch1.weight, backbone['b7.conv_branch1.weight'])
    with pytest.raises(InputError, match='wrong shape'):
        load_classifier_backbone(model, resnet38d.ResNet38(width=0.25).state_dict(), 'imagenet.pth')
