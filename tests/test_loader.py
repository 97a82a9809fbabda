"""The training input pipeline: augmentation draws as the reference's, uint8 items that widen on
the device to exactly the float items, and the bench's synthetic training set."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from bench import data as bench_data
from tests.test_data import error, make_root, save_mask
from tool.data.patches import TissueDataset, batch_to_device, random_augment
from tool.method.paper_layers import pseudo_mask_dirs

MASK_DIRS = ['train_gt', 'other']
CPU = torch.device('cpu')


def reference_augment(image, masks, kind):
    """The reference's augmentations restated from three torch uniforms u: stage 1 flips
    left-right if u0 < 0.5 and upside down if u1 < 0.5; stage 2 flips left-right if u0 < 0.5, and
    if u1 < 0.5 blurs the image (PIL GaussianBlur) with radius u2."""
    u = torch.rand(3).tolist()
    if u[0] < 0.5:
        image, masks = np.fliplr(image), [np.fliplr(m) for m in masks]
    if kind == 'flip' and u[1] < 0.5:
        image, masks = np.flipud(image), [np.flipud(m) for m in masks]
    if kind == 'flip_blur' and u[1] < 0.5:
        image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).filter(ImageFilter.GaussianBlur(u[2])))
    return image, masks


@pytest.mark.parametrize('kind', ['flip', 'flip_blur'])
def test_random_augment_is_the_reference_augmentation(kind):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    masks = [rng.integers(0, 5, (12, 16), dtype=np.uint8) for _ in range(3)]
    blurred = 0
    for seed in range(40):
        torch.manual_seed(seed)
        ours = random_augment(image, masks, kind)
        torch.manual_seed(seed)
        expected = reference_augment(image, masks, kind)
        assert np.array_equal(ours[0], expected[0]) and ours[0].flags.c_contiguous
        assert all(np.array_equal(a, b) and a.flags.c_contiguous for a, b in zip(ours[1], expected[1]))
        blurred += not any(np.array_equal(ours[0], f) for f in (image, image[:, ::-1], image[::-1], image[::-1, ::-1]))
    assert (blurred > 10) == (kind == 'flip_blur')


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='no GPU'))])
def test_batch_to_device_widens_every_byte_exactly(device):
    values = np.arange(256, dtype=np.uint8)
    batch = {'image': torch.from_numpy(values.reshape(1, 1, 16, 16)),
             'masks': torch.from_numpy(values[:5].reshape(1, 1, 1, 5))}
    images, masks = batch_to_device(batch, torch.device(device))
    assert images.dtype == torch.float32 and masks.dtype == torch.int64
    assert np.array_equal(images.cpu().numpy().ravel(), values / np.float32(255))  # the float items' division
    assert masks.tolist() == [[[[0, 1, 2, 3, 4]]]]
    floats = {'image': images, 'label': torch.ones(1, 4)}
    assert batch_to_device(floats, images.device)[0] is images and batch_to_device(floats, images.device)[1] is None


@pytest.mark.parametrize('augment', [None, 'flip', 'flip_blur'])
def test_uint8_items_widen_to_the_float_items(tmp_path, augment):
    root = make_root(tmp_path, size=(12, 16))
    floats = TissueDataset(root, 'train', 'luad', mask_dirs=MASK_DIRS, augment=augment)
    uint8s = TissueDataset(root, 'train', 'luad', mask_dirs=MASK_DIRS, augment=augment, as_uint8=True)
    for seed in range(8):
        for index in range(len(floats)):
            torch.manual_seed(seed)
            expected = floats[index]
            torch.manual_seed(seed)
            item = uint8s[index]
            assert item['image'].dtype == item['masks'].dtype == torch.uint8
            assert item['name'] == expected['name'] and torch.equal(item['label'], expected['label'])
            images, masks = batch_to_device({'image': item['image'][None], 'masks': item['masks'][None]}, CPU)
            assert torch.equal(images[0], expected['image']) and torch.equal(masks[0], expected['masks'])


def test_uint8_batches_from_workers_widen_to_the_float_batches(tmp_path):
    """Through DataLoader workers, as in training: the same seed draws the same batches."""
    root = make_root(tmp_path, size=(12, 16))
    runs = []
    for as_uint8 in (False, True):
        dataset = TissueDataset(root, 'train', 'luad', mask_dirs=MASK_DIRS, augment='flip_blur', as_uint8=as_uint8)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True, num_workers=2,
                                             generator=torch.Generator().manual_seed(3))
        runs.append([batch_to_device(batch, CPU) for _ in range(3) for batch in loader])
    for (image, masks), (image8, masks8) in zip(*runs):
        assert torch.equal(image, image8) and torch.equal(masks, masks8)


def test_uint8_items_keep_the_bad_input_errors(tmp_path):
    root = make_root(tmp_path)
    path = root / 'train' / 'p1-[1 0 0 1].png'
    path.write_bytes(path.read_bytes()[:-40])
    dataset = TissueDataset(root, 'train', 'luad', mask_dirs=['train_gt'], augment='flip_blur', as_uint8=True)
    assert error(dataset.__getitem__, 0).startswith(f'{path}: cannot decode the image, truncated or corrupt')
    save_mask(np.full((8, 8), 7), root / 'train_gt' / 'p2-[0 1 1 0].png')
    bad_mask = root / 'train_gt' / 'p2-[0 1 1 0].png'
    assert error(dataset.__getitem__, 1).startswith(f'{bad_mask}: mask value 7 outside 0..4')


def test_bench_dataset_copies_drawn_patches_under_labelled_names(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_data, 'UNIQUE_PATCHES', 3)
    root = tmp_path / 'synth'
    bench_data.write_bench_dataset(str(root), 16, 7, seed=0)
    dataset = TissueDataset(root, 'train', 'luad', mask_dirs=pseudo_mask_dirs())
    assert len(dataset) == 7
    drawn = sorted(p.name for p in (root / 'train').iterdir() if not p.name.startswith('copy'))
    assert len(drawn) == 3
    label = {name: label.tolist() for name, label in zip(dataset.names, dataset.labels)}
    for index in range(3, 7):
        original = drawn[index % 3]
        copy = f'copy{index:06d}-{original}'
        assert label[copy] == label[original]
        assert (root / 'train' / copy).read_bytes() == (root / 'train' / original).read_bytes()
        assert (root / 'train_PM' / 'PM_b4_5' / copy).read_bytes() == (root / 'train_gt' / original).read_bytes()
