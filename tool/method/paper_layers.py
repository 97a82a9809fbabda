"""The paper's three depths of the stage-1 classifier and what each becomes in stage 2: its
weight in the multi-layer pseudo-supervision loss and the folder of its pseudo-masks (named after
the layer). One mapping, so that a layer, its folder and its weight cannot be paired wrongly.

    PAPER_LAYERS     {layer: loss weight}, shallow to deep, as Grad-CAM reads them
    loss_weighted    one number for the three layers' scores, each weighted as the loss weights it
    LOSS_ORDER       deep to shallow: the reference's order of the masks in the loss and of
                     --pm_weights; the first, bn7, decides where the background channel is on
"""
PAPER_LAYERS = {'b4_5': 0.2, 'b5_2': 0.2, 'bn7': 0.6}  # Han et al. 2022
LOSS_ORDER = ('bn7', 'b5_2', 'b4_5')
PSEUDO_MASK_ROOT = 'train_PM'  # under the dataset root


def pseudo_mask_folder(layer):
    """The folder of a layer's pseudo-masks (any layer 2_generate_PM.py --layers takes)."""
    return f'PM_{layer}'


def pseudo_mask_dirs(layers=LOSS_ORDER):
    """The mask folders of `layers`, relative to the dataset root, in that order."""
    return [f'{PSEUDO_MASK_ROOT}/{pseudo_mask_folder(layer)}' for layer in layers]


def loss_weights(layers=LOSS_ORDER):
    return tuple(PAPER_LAYERS[layer] for layer in layers)


def loss_weighted(scores):
    """{layer: score} of the three layers -> their mean weighted as the stage-2 loss weights them:
    how good the pseudo-masks are for what stage 2 learns from them."""
    return sum(weight * scores[layer] for layer, weight in PAPER_LAYERS.items())
