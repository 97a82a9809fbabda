"""Test-time augmentation over the eight symmetries of the square (tool/method/dihedral.py),
against NumPy's own rotations and mirrors, and on Grad-CAM."""
import numpy as np
import pytest
import torch

from tests.test_gradcam import as_input, patches_with_white, small_model
from tool.method.dihedral import D4, TRANSFORMS, mean_over_symmetries, transform, untransform
from tool.method.gradcam import multi_layer_grad_cam


def numpy_transform(images, turns, mirrored):
    """The obviously-correct version: np.rot90 in the image plane, then np.flip left-right."""
    turned = np.rot90(images, turns, axes=(2, 3))
    return np.flip(turned, 3) if mirrored else turned


def numpy_untransform(maps, turns, mirrored):
    unmirrored = np.flip(maps, 3) if mirrored else maps
    return np.rot90(unmirrored, -turns, axes=(2, 3))


def test_the_eight_transforms_are_numpys_distinct_and_inverted():
    images = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).reshape(2, 3, 4, 6)  # not square, no symmetry
    seen = set()
    for turns, mirrored in D4:
        moved = transform(images, turns, mirrored)
        np.testing.assert_array_equal(moved.numpy(), numpy_transform(images.numpy(), turns, mirrored))
        assert torch.equal(untransform(moved, turns, mirrored), images)
        seen.add(moved.numpy().tobytes())
    assert len(seen) == 8 and TRANSFORMS['d4'] == D4 and TRANSFORMS['none'] == ((0, False),)


def test_none_is_the_patch_alone():
    images = as_input(patches_with_white(2, 32, 32, seed=1))
    model = small_model()
    plain = multi_layer_grad_cam(model, images)
    once = mean_over_symmetries(lambda x: multi_layer_grad_cam(model, x), images, TRANSFORMS['none'])
    assert all(torch.equal(once[layer], plain[layer]) for layer in plain)


@pytest.mark.parametrize('size', [(32, 32), (32, 48)])
def test_d4_grad_cam_is_the_mean_of_the_eight_maps_mapped_back(size):
    images = as_input(patches_with_white(2, *size, seed=2))
    model = small_model()
    mean = mean_over_symmetries(lambda x: multi_layer_grad_cam(model, x), images, TRANSFORMS['d4'])
    views = {(t, m): multi_layer_grad_cam(model, torch.from_numpy(numpy_transform(images.numpy(), t, m).copy()))
             for t, m in D4}
    for layer in mean:
        by_hand = np.mean([numpy_untransform(views[t, m][layer].numpy(), t, m) for t, m in D4], axis=0)
        assert mean[layer].shape == (2, 4, *size)
        np.testing.assert_allclose(mean[layer].numpy(), by_hand, rtol=1e-10, atol=1e-12)


def test_d4_maps_turn_with_the_patch():
    """The mean over the group is equivariant: the maps of a turned or mirrored patch are the
    patch's maps turned or mirrored, which the maps of one view are not."""
    images = as_input(patches_with_white(1, 32, 32, seed=3))
    model = small_model()
    maps = lambda x, group: mean_over_symmetries(lambda y: multi_layer_grad_cam(model, y), x, TRANSFORMS[group])
    for turns, mirrored in D4[1:]:
        moved = transform(images, turns, mirrored)
        for layer, cams in maps(images, 'd4').items():
            torch.testing.assert_close(maps(moved, 'd4')[layer], transform(cams, turns, mirrored), rtol=1e-9, atol=1e-12)
    plain, moved = maps(images, 'none')['b4_5'], maps(transform(images, 1, False), 'none')['b4_5']
    assert not torch.allclose(moved, transform(plain, 1, False), rtol=1e-3)
