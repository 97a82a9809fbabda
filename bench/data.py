"""The synthetic training set the bench scripts load: patches in the layout of the released
datasets, with the synthetic truth copied as the three pseudo-masks stage 2 reads."""
import os
import shutil

from tool.data.patches import TissueDataset
from tool.data.synth import write_dataset
from tool.method.paper_layers import pseudo_mask_dirs

UNIQUE_PATCHES = 256  # drawn; the rest of a larger set are copies


def write_bench_dataset(root, size, patches, seed):
    """`patches` train patches of size x size px under root (and one val and one test patch, which
    the stages' loaders require), and root/train_PM/* as copies of root/train_gt.

    Only the first UNIQUE_PATCHES are drawn (~25 ms a patch at 224 px); the others are copies of
    them under new names, label kept: a copy costs the same to decode and augment, and an epoch
    long enough for a GPU (thousands of patches) is written in seconds."""
    write_dataset(root, 'luad', size, {'train': min(patches, UNIQUE_PATCHES), 'val': 1, 'test': 1}, seed)
    drawn = sorted(os.listdir(os.path.join(root, 'train')))
    for index in range(len(drawn), patches):
        name = drawn[index % len(drawn)]
        for folder in ('train', 'train_gt'):
            shutil.copyfile(os.path.join(root, folder, name), os.path.join(root, folder, f'copy{index:06d}-{name}'))
    for mask_dir in pseudo_mask_dirs():
        shutil.copytree(os.path.join(root, 'train_gt'), os.path.join(root, mask_dir))


def with_items(dataset, as_uint8):
    """A training set read like `dataset`, with float32 (the reference's) or uint8 items."""
    return TissueDataset(dataset.root, dataset.split, dataset.dataset, mask_dirs=dataset.mask_dirs,
                         augment=dataset.augment, as_uint8=as_uint8)
