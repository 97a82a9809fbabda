"""Test-time augmentation over the eight symmetries of the square (the dihedral group D4).

A tissue patch has no up, down, left or right: each of its four rotations, mirrored or not, is
as likely a patch as the patch itself. Maps computed on each of the eight and mapped back are
equally valid maps of the patch; their mean no longer depends on where the network's coarse
cells (12 x 12 on a 96 px patch) and its asymmetric kernels happen to fall. Not in the paper
nor the reference (`none` is theirs); 2_generate_PM.py --tta d4 and the recipe search's pm-d4
candidate use it (docs/results.md, "Grad-CAM over the eight symmetries").
"""
import torch

# (quarter turns, mirrored): the identity first, so that `none` is exactly the patch itself.
D4 = tuple((turns, mirrored) for turns in range(4) for mirrored in (False, True))
TRANSFORMS = {'none': D4[:1], 'd4': D4}


def transform(images, turns, mirrored):
    """(B, C, H, W) turned by `turns` quarter turns in the image plane, then mirrored left-right."""
    turned = torch.rot90(images, turns, dims=(2, 3))
    return turned.flip(3) if mirrored else turned


def untransform(maps, turns, mirrored):
    """The inverse of transform: maps of a transformed patch back onto the patch."""
    unmirrored = maps.flip(3) if mirrored else maps
    return torch.rot90(unmirrored, -turns, dims=(2, 3))


def mean_over_symmetries(maps_of, images, transforms):
    """{name: (B, C, H, W)}: the mean over `transforms` of maps_of(transformed images), each map
    mapped back onto the patches. maps_of: images -> {name: (B, C, H, W) maps of those images}.
    With the identity alone, maps_of(images) itself. Non-square patches work: a quarter turn
    swaps H and W and the inverse swaps them back."""
    # Not through the loop: the reference's masks need its maps bit for bit, and the loop's
    # copy of the identity view does not give them (tests/test_dihedral.py).
    if transforms == TRANSFORMS['none']:
        return maps_of(images)
    total = {}
    for turns, mirrored in transforms:
        for name, maps in maps_of(transform(images, turns, mirrored)).items():
            back = untransform(maps, turns, mirrored)
            total[name] = back if name not in total else total[name] + back
    return {name: maps / len(transforms) for name, maps in total.items()}
