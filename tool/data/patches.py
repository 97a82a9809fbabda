"""Tissue patches, their labels and masks: reading, checking, augmenting.

One dataset class serves every stage. The folder layout is the reference's:

    <root>/train/*.png              patches, patch-level label in the file name (or a CSV)
    <root>/val/img, val/mask        patches and pixel masks of the same file names
    <root>/test/img, test/mask
    <root>/train_PM/PM_bn7 ...      pseudo-masks of the train patches (stage 2), same names

Masks hold class indices 0..3 and BACKGROUND (4, white non-tissue, excluded from metrics).
Bad input raises InputError naming the file: the cheap checks (names, labels, masks present,
sizes from the PNG headers) when the dataset is built, decoding errors when a patch is read.
"""
import csv
import os

import numpy as np
import torch
from PIL import Image, ImageFilter

from tool.core.errors import InputError
from tool.core.log import log
from tool.data.datasets import BACKGROUND, DATASETS, N_CLASS

AUGMENTATIONS = (None, 'flip', 'flip_blur')


def parse_label(filename, dataset):
    """The patch-level label written in a file name: np.float32 array (4,) of 0/1."""
    style = DATASETS[dataset].label_style
    if style is None:
        raise InputError(f'{filename}: --dataset {dataset} has no labels in file names '
                         f'(expected luad or bcss; a custom dataset takes its labels from a CSV)')
    name = os.path.basename(filename)  # brackets in folder names are not labels
    start = name.rfind('[')
    end = name.find(']', start + 1)
    if start < 0 or end < 0:
        raise InputError(f'{filename}: no label in the file name; --dataset {dataset} expects '
                         f'{DATASETS[dataset].label_example}')
    text = name[start + 1:end]
    if not style.fullmatch(text):
        other = [d for d, info in DATASETS.items()
                 if d != dataset and info.label_style and info.label_style.fullmatch(text)]
        found = f'a {other[0]}-style label' if other else 'the label'
        raise InputError(f'{filename}: {found} [{text}] does not fit --dataset {dataset}, which expects '
                         f'{DATASETS[dataset].label_example}')
    return check_label(np.array(text.split() if ' ' in text else list(text), dtype=np.float32), filename)


def check_label(label, name):
    if not label.any():
        raise InputError(f'{name}: label [0 0 0 0] names no class; every training patch needs at least one')
    return label


def read_labels_csv(path):
    """Labels of a custom dataset: {file name: np.float32 (4,)} from rows 'file,a,b,c,d'.

    A first row whose label columns are not 0/1 is a header and skipped."""
    try:
        with open(path, newline='') as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f'{path}: cannot read the labels CSV ({e})') from None
    labels = {}
    for line, row in enumerate(rows, start=1):
        row = [cell.strip() for cell in row]
        if not any(row):
            continue
        values = row[1:]
        if len(row) != 5 or any(v not in ('0', '1') for v in values):
            if line == 1 and len(row) == 5:
                continue
            raise InputError(f'{path}: line {line} should be "file,a,b,c,d" with 0/1 labels, got {",".join(row)!r}')
        if row[0] in labels:
            raise InputError(f'{path}: line {line} repeats {row[0]}')
        labels[row[0]] = check_label(np.array(values, dtype=np.float32), f'{path}: line {line} ({row[0]})')
    return labels


def open_image(path):
    """Open a PNG lazily (header only); a file that is not an image is an InputError."""
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise InputError(f'{path}: file not found') from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f'{path}: not a readable image ({e})') from None


def png_width_height(path):
    """(width, height) from the PNG's header (or any image PIL reads), without decoding the pixels."""
    with open_image(path) as image:
        return image.size


def decode(image, path):
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f'{path}: cannot decode the image, truncated or corrupt ({e})') from None


def read_rgb(path):
    """The patch as np.uint8 (H, W, 3). Alpha is dropped (as the reference's convert('RGB')),
    grayscale and palette images are expanded, 16/32-bit grayscale is scaled to 8 bits."""
    with open_image(path) as image:
        decode(image, path)
        if image.mode.startswith('I'):
            # 16-bit PNGs decode to 'I;16' (or 'I'); 65535 / 257 = 255 maps full scale to full scale.
            gray = np.round(np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257).astype(np.uint8)
            return np.repeat(gray[:, :, None], 3, axis=2)
        return np.asarray(image.convert('RGB'))


def read_mask(path):
    """Class indices np.uint8 (H, W) from a palette PNG (the indices) or a grayscale PNG (the
    values), checked to lie in 0..4."""
    with open_image(path) as image:
        decode(image, path)
        if image.mode not in ('P', 'L'):
            raise InputError(f'{path}: a mask must be a palette (P) or grayscale (L) PNG of class '
                             f'indices, got mode {image.mode}')
        mask = np.array(image)
    if mask.max() > BACKGROUND:
        bad = np.unique(mask[mask > BACKGROUND])
        raise InputError(f'{path}: mask value {bad[0]} outside 0..{BACKGROUND} '
                         f'({len(bad)} distinct bad value(s): {bad[:5].tolist()})')
    return mask


def image_to_rgb(image):
    """A dataset item's image, float (3, H, W) = RGB / 255, back to its uint8 (H, W, 3) bytes,
    exactly (rounding undoes the float32 division)."""
    return (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def colourise(mask, palette):
    """uint8 (H, W, 3): each class index of `mask` in its palette colour."""
    return np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[mask]


def label_from_mask(mask):
    """Classes present in a pixel mask (background is not a class)."""
    return np.bincount(mask.ravel(), minlength=BACKGROUND + 1)[:N_CLASS].astype(bool).astype(np.float32)


SKIPPED_SHOWN = 3  # how many skipped files a note names


def list_pngs(folder):
    """Sorted '.png' file names of a folder. Other files and hidden ones ('._x.png' from macOS
    archives) are left out, like the reference's glob, but not silently: a note counts them and
    names the first few (a user who saved patches as JPEG would otherwise get fewer
    patches than they think)."""
    if not os.path.isdir(folder):
        raise InputError(f'{folder}: folder not found')
    files = sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))
    names = [n for n in files if n.endswith('.png') and not n.startswith('.')]
    skipped = sorted(set(files) - set(names))
    shown = ', '.join(skipped[:SKIPPED_SHOWN]) + (', ...' if len(skipped) > SKIPPED_SHOWN else '')
    if not names:
        raise InputError(f'{folder}: no .png files' + (f' ({len(skipped)} other file(s): {shown}; patches and '
                                                      f'masks must be PNG)' if skipped else ''))
    if skipped:
        log.info(f'note: {folder}: {len(skipped)} file(s) skipped, not .png patches or masks: {shown}')
    return names


class TissueDataset(torch.utils.data.Dataset):
    """Patches of one split, each with its patch label and optional masks of the same name.

    split 'train': images root/train/*.png, labels from the file names (dataset 'luad' or
    'bcss') or from labels_csv (required for 'custom'). split 'val'/'test': images
    root/<split>/img, masks by default from <split>/mask, label = classes present in
    <split>/mask. mask_dirs: folders under root with a mask per image (e.g. the three
    pseudo-mask folders, or 'train_gt'). files: restrict to these file names.
    augment: None, 'flip' (random horizontal and vertical flips; stage 1) or 'flip_blur'
    (horizontal flip, then with p=0.5 a Gaussian blur of radius U(0, 1) on the image only;
    stage 2). Random draws come from torch, so DataLoader worker seeding makes them repeatable.
    as_uint8: items hold the image as uint8 (3, H, W) RGB and the masks as uint8, a quarter of the
    float32 image's bytes and an eighth of the int64 masks' to hand from the loader workers to the
    training process, to pin and to copy to the GPU; batch_to_device widens them there, exactly.
    """

    def __init__(self, root, split, dataset, mask_dirs=None, augment=None, labels_csv=None, files=None,
                 as_uint8=False):
        if dataset not in DATASETS:
            raise InputError(f'--dataset {dataset}: unknown (choose from {", ".join(DATASETS)})')
        if split not in ('train', 'val', 'test'):
            raise InputError(f'split {split!r}: unknown (choose from train, val, test)')
        if augment not in AUGMENTATIONS:
            raise InputError(f'augment {augment!r}: unknown (choose from {AUGMENTATIONS})')
        self.root, self.split, self.dataset, self.augment = root, split, dataset, augment
        self.as_uint8 = as_uint8
        # Train labels come from names or a CSV; val/test labels from their ground-truth masks.
        self.label_dir = None if split == 'train' else os.path.join(split, 'mask')
        if mask_dirs is None:
            mask_dirs = [] if split == 'train' else [self.label_dir]
        self.mask_dirs = list(mask_dirs)
        self.image_dir = os.path.join(root, 'train' if split == 'train' else os.path.join(split, 'img'))

        self.names = self.select_names(list_pngs(self.image_dir), files)
        self.check_masks_match_images()
        self._labels = self.read_train_labels(labels_csv) if split == 'train' else None

    def select_names(self, present, files):
        if files is None:
            return present
        missing = sorted(set(files) - set(present))
        if missing:
            raise InputError(f'{os.path.join(self.image_dir, missing[0])}: file not found '
                             f'({len(missing)} requested file(s) missing)')
        return sorted(set(files))

    def check_masks_match_images(self):
        folders = list(self.mask_dirs)
        if self.label_dir is not None and self.label_dir not in folders:
            folders.append(self.label_dir)
        for folder in folders:
            if not os.path.isdir(os.path.join(self.root, folder)):
                raise InputError(f'{os.path.join(self.root, folder)}: mask folder not found')
        for name in self.names:
            size = png_width_height(os.path.join(self.image_dir, name))
            for folder in folders:
                path = os.path.join(self.root, folder, name)
                if not os.path.isfile(path):
                    raise InputError(f'{path}: mask missing for image {os.path.join(self.image_dir, name)}')
                mask_size = png_width_height(path)
                if mask_size != size:
                    raise InputError(f'{path}: mask is {mask_size[0]}x{mask_size[1]} but the image '
                                     f'is {size[0]}x{size[1]}')

    def read_train_labels(self, labels_csv):
        if labels_csv is None:
            if self.dataset == 'custom':
                raise InputError(f'{self.image_dir}: --dataset custom needs a labels CSV (file,a,b,c,d)')
            return np.stack([parse_label(os.path.join(self.image_dir, name), self.dataset) for name in self.names])
        table = read_labels_csv(labels_csv)
        for name in self.names:
            if name not in table:
                raise InputError(f'{os.path.join(self.image_dir, name)}: no row in {labels_csv}')
        return np.stack([table[name] for name in self.names])

    @property
    def labels(self):
        """np.float32 (N, 4). For val/test the masks are read once, on first use."""
        if self._labels is None:
            self._labels = np.stack([label_from_mask(read_mask(os.path.join(self.root, self.label_dir, name)))
                                     for name in self.names])
        return self._labels

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        name = self.names[index]
        image = read_rgb(os.path.join(self.image_dir, name))
        masks = [read_mask(os.path.join(self.root, folder, name)) for folder in self.mask_dirs]
        if self._labels is not None:
            label = self._labels[index]
        elif self.label_dir in self.mask_dirs:
            label = label_from_mask(masks[self.mask_dirs.index(self.label_dir)])
        else:
            label = label_from_mask(read_mask(os.path.join(self.root, self.label_dir, name)))
        if self.augment is not None:
            image, masks = random_augment(image, masks, self.augment)
        return make_item(name, image, label, masks, self.as_uint8)


def make_item(name, image, label, masks, as_uint8=False):
    """A dataset item from a uint8 (H, W, 3) image and uint8 (H, W) masks: the image as float32
    (3, H, W) = RGB / 255 and the masks as int64 (K, H, W) class indices (what the losses take),
    or both as uint8 with as_uint8."""
    chw = np.ascontiguousarray(image.transpose(2, 0, 1))
    item = dict(name=name, image=torch.from_numpy(chw if as_uint8 else chw / np.float32(255)),
                label=torch.from_numpy(label.copy()))
    if masks:
        stacked = np.stack(masks)
        item['masks'] = torch.from_numpy(stacked if as_uint8 else stacked.astype(np.int64))
    return item


def batch_to_device(batch, device):
    """(images, masks or None) of a batch on `device` as float32 RGB / 255 and int64 class indices,
    from float or uint8 items alike (copies from pinned memory do not block). uint8 items are
    widened on the device, to the float items' exact values: the divisor is a tensor on the
    device, because CUDA divides by a Python number as a multiplication by its reciprocal,
    which is 1 ulp off for 126 of the 256 values."""
    images = batch['image'].to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = images.float().div_(torch.full((), 255.0, device=device))
    masks = batch.get('masks')
    return images, None if masks is None else masks.to(device, non_blocking=True).long()


def random_augment(image, masks, kind):
    """Flip the image and all masks together; blur only the image (masks stay exact)."""
    horizontal, vertical, radius = draw_augmentation(kind)
    image, masks = flip(image, horizontal, vertical), [flip(m, horizontal, vertical) for m in masks]
    if radius is not None:
        image = blur(image, radius)
    return np.ascontiguousarray(image), [np.ascontiguousarray(m) for m in masks]


def draw_augmentation(kind):
    """(horizontal flip, vertical flip, blur radius or None) of one sample from three torch
    uniforms u: 'flip' flips horizontally if u0 < 0.5 and vertically if u1 < 0.5 (stage 1);
    'flip_blur' flips horizontally if u0 < 0.5 and blurs with radius u2 if u1 < 0.5 (stage 2)."""
    u = torch.rand(3).tolist()
    if kind == 'flip':
        return u[0] < 0.5, u[1] < 0.5, None
    return u[0] < 0.5, False, u[2] if u[1] < 0.5 else None


def flip(array, horizontal, vertical):
    """An (H, W, ...) array flipped left-right and/or upside down (a view)."""
    return array[::-1 if vertical else 1, ::-1 if horizontal else 1]


def blur(image, radius):
    """PIL's Gaussian blur, the reference's, of a uint8 (H, W, 3) image."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).filter(ImageFilter.GaussianBlur(radius=radius)))
