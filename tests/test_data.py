import numpy as np
import pytest
import torch
from PIL import Image

from tests.compat import FIXTURES
from tool.core.errors import InputError
from tool.data.datasets import BACKGROUND, DATASETS
from tool.data.patches import TissueDataset, list_pngs, parse_label, read_labels_csv, read_mask, read_rgb


def rgb(h=8, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save_mask(mask, path):
    image = Image.fromarray(np.asarray(mask, np.uint8), 'P')
    image.putpalette(DATASETS['luad'].palette)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def save_rgb(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def error(call, *args, **kwargs):
    with pytest.raises(InputError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert '\n' not in message
    return message


# ---- labels ------------------------------------------------------------------------------------

def test_parse_label_both_styles():
    assert parse_label('1031280-2300-27920-[1 0 0 1].png', 'luad').tolist() == [1, 0, 0, 1]
    assert parse_label('TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101].png', 'bcss').tolist() == [1, 1, 0, 1]
    label = parse_label('/data/[old]/x[2]-[0 1 1 0].png', 'luad')  # last '[' of the file name counts
    assert label.dtype == np.float32 and label.tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize('name, dataset, problem', [
    ('a-[1 0 0 1].png', 'bcss', "luad-style label [1 0 0 1] does not fit --dataset bcss, which expects '[abcd]'"),
    ('a+0[1001].png', 'luad', "bcss-style label [1001] does not fit --dataset luad, which expects '[a b c d]'"),
    ('a-1001.png', 'luad', 'no label in the file name'),
    ('a-[1 0 0 1.png', 'luad', 'no label in the file name'),
    ('a-[1 0 2 1].png', 'luad', "the label [1 0 2 1] does not fit --dataset luad"),
    ('a-[1  0 0 1].png', 'luad', "the label [1  0 0 1] does not fit"),
    ('a-[0 0 0 0].png', 'luad', 'label [0 0 0 0] names no class'),
    ('a[0000].png', 'bcss', 'label [0 0 0 0] names no class'),
    ('a[1001].png', 'custom', 'takes its labels from a CSV'),
])
def test_parse_label_errors_name_file_and_problem(name, dataset, problem):
    message = error(parse_label, f'/d/{name}', dataset)
    assert message.startswith(f'/d/{name}: ') and problem in message


def test_labels_csv(tmp_path):
    path = tmp_path / 'labels.csv'
    path.write_text('file,TE,NEC,LYM,TAS\na.png,1,0,0,1\n\n b.png , 0,1,1,0\n')
    labels = read_labels_csv(path)
    assert {k: v.tolist() for k, v in labels.items()} == {'a.png': [1, 0, 0, 1], 'b.png': [0, 1, 1, 0]}
    path.write_text('a.png,1,0,0,1\n')  # no header
    assert read_labels_csv(path)['a.png'].tolist() == [1, 0, 0, 1]
    for text, problem in [('a.png,1,0,0\n', 'line 1 should be'), ('h,a,b,c,d\na.png,1,0,2,1\n', 'line 2 should be'),
                          ('a.png,1,0,0,1\na.png,1,0,0,1\n', 'line 2 repeats a.png'),
                          ('a.png,0,0,0,0\n', 'line 1 (a.png): label [0 0 0 0] names no class')]:
        path.write_text(text)
        message = error(read_labels_csv, path)
        assert message.startswith(f'{path}: ') and problem in message
    assert 'cannot read' in error(read_labels_csv, tmp_path / 'missing.csv')


# ---- pixels ------------------------------------------------------------------------------------

def test_read_rgb_converts_other_modes(tmp_path):
    base = rgb()
    rgba = np.concatenate([base, np.full((8, 8, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'rgba.png')
    assert np.array_equal(read_rgb(tmp_path / 'rgba.png'), base)  # alpha dropped, colour kept
    gray = base[:, :, 0]
    Image.fromarray(gray, 'L').save(tmp_path / 'l.png')
    Image.fromarray(gray, 'L').convert('LA').save(tmp_path / 'la.png')
    for name in ('l.png', 'la.png'):
        assert np.array_equal(read_rgb(tmp_path / name), np.repeat(gray[:, :, None], 3, axis=2))
    Image.fromarray(base).convert('P').save(tmp_path / 'p.png')
    assert np.array_equal(read_rgb(tmp_path / 'p.png'), np.asarray(Image.open(tmp_path / 'p.png').convert('RGB')))
    deep = np.array([[0, 257, 65535, 1000]], np.uint16)
    Image.fromarray(deep).save(tmp_path / 'i16.png')
    assert Image.open(tmp_path / 'i16.png').mode == 'I;16'
    out = read_rgb(tmp_path / 'i16.png')
    assert out.dtype == np.uint8 and out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 1, 255, 4] and np.array_equal(out[..., 0], out[..., 2])


def test_read_mask_modes_and_range(tmp_path):
    values = np.array([[0, 1, 2], [3, 4, 0]], np.uint8)
    save_mask(values, tmp_path / 'p.png')
    Image.fromarray(values, 'L').save(tmp_path / 'l.png')
    for name in ('p.png', 'l.png'):
        mask = read_mask(tmp_path / name)
        assert mask.dtype == np.uint8 and np.array_equal(mask, values)
    Image.fromarray(np.array([[0, 7, 255]], np.uint8), 'L').save(tmp_path / 'bad.png')
    message = error(read_mask, tmp_path / 'bad.png')
    assert message.startswith(f'{tmp_path / "bad.png"}: mask value 7 outside 0..4') and '[7, 255]' in message
    Image.fromarray(rgb()).save(tmp_path / 'rgb.png')
    assert 'got mode RGB' in error(read_mask, tmp_path / 'rgb.png')


# ---- datasets on disk --------------------------------------------------------------------------

LUAD_NAMES = ('p1-[1 0 0 1].png', 'p2-[0 1 1 0].png', 'p3-[0 0 1 0].png')


def make_root(tmp_path, names=LUAD_NAMES, size=(8, 8)):
    """train/ with labelled names and train_gt/ masks whose value is also written into the red
    channel (mask * 50), so any augmentation must keep image and masks aligned."""
    for i, name in enumerate(names):
        mask = np.random.default_rng(i).integers(0, 5, size, dtype=np.uint8)
        image = rgb(*size, seed=i)
        image[:, :, 0] = mask * 50
        save_rgb(image, tmp_path / 'train' / name)
        save_mask(mask, tmp_path / 'train_gt' / name)
        save_mask(4 - mask, tmp_path / 'other' / name)
    for split in ('val', 'test'):
        save_rgb(rgb(*size), tmp_path / split / 'img' / 'v.png')
        save_mask(np.array([[2, 4], [0, 4]]).repeat(size[0] // 2, 0).repeat(size[1] // 2, 1),
                  tmp_path / split / 'mask' / 'v.png')
    return tmp_path


def test_train_items_and_labels(tmp_path):
    root = make_root(tmp_path)
    (root / 'train' / 'notes.txt').write_text('ignored')
    (root / 'train' / '._p1-[1 0 0 1].png').write_bytes(b'macOS metadata')  # hidden: ignored
    ds = TissueDataset(root, 'train', 'luad')
    assert ds.names == sorted(LUAD_NAMES) and len(ds) == 3
    assert ds.labels.tolist() == [[1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 1, 0]]
    item = ds[1]
    assert set(item) == {'name', 'image', 'label'}  # no mask_dirs: no masks
    assert item['name'] == 'p2-[0 1 1 0].png' and item['label'].dtype == torch.float32
    expected = np.asarray(Image.open(root / 'train' / 'p2-[0 1 1 0].png'), np.float32).transpose(2, 0, 1) / 255
    assert item['image'].dtype == torch.float32 and item['image'].shape == (3, 8, 8)
    assert torch.equal(item['image'], torch.from_numpy(expected))
    ds = TissueDataset(root, 'train', 'luad', mask_dirs=['train_gt', 'other'], files=['p3-[0 0 1 0].png'])
    masks = ds[0]['masks']
    assert ds.names == ['p3-[0 0 1 0].png'] and masks.dtype == torch.int64 and masks.shape == (2, 8, 8)
    assert torch.equal(masks[0] + masks[1], torch.full((8, 8), 4))


def test_val_test_labels_come_from_masks(tmp_path):
    root = make_root(tmp_path)
    for split in ('val', 'test'):
        ds = TissueDataset(root, split, 'luad')
        item = ds[0]
        assert item['label'].tolist() == [1, 0, 1, 0] and ds.labels.tolist() == [[1, 0, 1, 0]]
        assert item['masks'].shape == (1, 8, 8) and int(item['masks'][0, 0, 0]) == 2
        ds = TissueDataset(root, split, 'bcss', mask_dirs=[])
        assert 'masks' not in ds[0] and ds[0]['label'].tolist() == [1, 0, 1, 0]


def test_custom_dataset_reads_labels_csv(tmp_path):
    for name in ('a.png', 'b.png'):
        save_rgb(rgb(), tmp_path / 'train' / name)
    (tmp_path / 'labels.csv').write_text('file,a,b,c,d\nb.png,0,0,1,1\na.png,1,0,0,0\nother.png,0,1,0,0\n')
    ds = TissueDataset(tmp_path, 'train', 'custom', labels_csv=tmp_path / 'labels.csv')
    assert ds.labels.tolist() == [[1, 0, 0, 0], [0, 0, 1, 1]] and ds[1]['label'].tolist() == [0, 0, 1, 1]
    assert DATASETS['custom'].class_names == DATASETS['luad'].class_names and DATASETS['custom'].palette == DATASETS['luad'].palette
    assert 'needs a labels CSV' in error(TissueDataset, tmp_path, 'train', 'custom')
    (tmp_path / 'labels.csv').write_text('a.png,1,0,0,0\n')
    message = error(TissueDataset, tmp_path, 'train', 'custom', labels_csv=tmp_path / 'labels.csv')
    assert message == f'{tmp_path / "train" / "b.png"}: no row in {tmp_path / "labels.csv"}'


def test_construction_errors_name_the_file(tmp_path):
    root = make_root(tmp_path)
    train = root / 'train'
    cases = []

    def case(problem, path, **kwargs):
        cases.append((kwargs, str(path), problem))

    case('folder not found', root / 'nowhere' / 'train', root_=root / 'nowhere')
    (root / 'empty' / 'train').mkdir(parents=True)
    case('no .png files', root / 'empty' / 'train', root_=root / 'empty')
    case('mask folder not found', root / 'PM', mask_dirs=['PM'])
    case('--dataset bcss, which expects', train / 'p1-[1 0 0 1].png', dataset='bcss')
    case('file not found', train / 'zz.png', files=['zz.png'])
    case('unknown', '--dataset x', dataset='x')
    for kwargs, path, problem in cases:
        kwargs = dict(root=kwargs.pop('root_', root), split='train', dataset=kwargs.pop('dataset', 'luad'), **kwargs)
        message = error(TissueDataset, **kwargs)
        assert message.startswith(path + ': ') and problem in message, message

    (root / 'train_gt' / 'p2-[0 1 1 0].png').unlink()
    message = error(TissueDataset, root, 'train', 'luad', mask_dirs=['train_gt'])
    assert message == f'{root / "train_gt" / "p2-[0 1 1 0].png"}: mask missing for image {train / "p2-[0 1 1 0].png"}'
    save_mask(np.zeros((8, 6)), root / 'train_gt' / 'p2-[0 1 1 0].png')
    message = error(TissueDataset, root, 'train', 'luad', mask_dirs=['train_gt'])
    assert message == f'{root / "train_gt" / "p2-[0 1 1 0].png"}: mask is 6x8 but the image is 8x8'
    (root / 'val' / 'mask' / 'v.png').unlink()
    message = error(TissueDataset, root, 'val', 'luad', mask_dirs=[])  # labels still need the mask
    assert message.startswith(f'{root / "val" / "mask" / "v.png"}: mask missing for image')

    save_rgb(rgb(), train / 'q-[0 0 0 0].png')
    assert error(TissueDataset, root, 'train', 'luad') == (
        f'{train / "q-[0 0 0 0].png"}: label [0 0 0 0] names no class; every training patch needs at least one')
    (train / 'q-[0 0 0 0].png').unlink()
    (train / 'r-[1 0 0 0].png').write_text('not an image')
    message = error(TissueDataset, root, 'train', 'luad')
    assert message.startswith(f'{train / "r-[1 0 0 0].png"}: not a readable image')


def test_read_time_errors_name_the_file(tmp_path):
    root = make_root(tmp_path)
    path = root / 'train' / 'p1-[1 0 0 1].png'
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    ds = TissueDataset(root, 'train', 'luad', mask_dirs=['train_gt'])  # the header is intact
    message = error(ds.__getitem__, 0)
    assert message.startswith(f'{path}: cannot decode the image, truncated or corrupt')
    save_mask(np.full((8, 8), 9), root / 'train_gt' / 'p2-[0 1 1 0].png')
    message = error(ds.__getitem__, 1)
    assert message.startswith(f'{root / "train_gt" / "p2-[0 1 1 0].png"}: mask value 9 outside 0..4')


# ---- augmentation ------------------------------------------------------------------------------

def flips(array):
    """The four flips of an (..., H, W) array, keyed by (horizontal, vertical)."""
    return {(h, v): array[..., ::-1 if v else 1, :][..., ::-1 if h else 1]
            for h in (False, True) for v in (False, True)}


def augmented_items(root, augment, seeds=range(32)):
    ds = TissueDataset(root, 'train', 'luad', mask_dirs=['train_gt', 'other'], augment=augment)
    plain = TissueDataset(root, 'train', 'luad', mask_dirs=['train_gt', 'other'])[0]
    items = []
    for seed in seeds:
        torch.manual_seed(seed)
        items.append(ds[0])
    return plain, items


def test_flip_moves_image_and_masks_together(tmp_path):
    plain, items = augmented_items(make_root(tmp_path, size=(8, 10)), 'flip')
    seen = set()
    for item in items:
        # the image's red channel encodes train_gt: alignment survives whatever was drawn
        assert torch.equal(torch.round(item['image'][0] * 255 / 50).long(), item['masks'][0])
        assert torch.equal(item['masks'][0] + item['masks'][1], torch.full((8, 10), 4))
        match = [k for k, f in flips(plain['image'].numpy()).items() if np.array_equal(f, item['image'].numpy())]
        assert len(match) == 1  # exactly a flip: no blur, no other change
        assert np.array_equal(flips(plain['masks'].numpy())[match[0]], item['masks'].numpy())
        seen.add(match[0])
    assert seen == {(False, False), (False, True), (True, False), (True, True)}


def test_flip_blur_blurs_only_the_image(tmp_path):
    plain, items = augmented_items(make_root(tmp_path, size=(8, 10)), 'flip_blur')
    blurred = flipped = 0
    for item in items:
        hflip = np.array_equal(item['masks'].numpy(), flips(plain['masks'].numpy())[True, False])
        assert hflip or torch.equal(item['masks'], plain['masks'])  # masks: exact, never flipped vertically
        exact = flips(plain['image'].numpy())[hflip, False]
        if not np.array_equal(item['image'].numpy(), exact):
            blurred += 1
            image = item['image'].numpy()
            assert abs(image.mean() - exact.mean()) < 0.02  # a blur keeps the mean ...
            assert np.abs(np.diff(image, axis=2)).mean() < np.abs(np.diff(exact, axis=2)).mean()  # ... and smooths
        flipped += hflip
    assert 8 <= blurred <= 24 and 8 <= flipped <= 24  # both with p = 0.5 over 32 draws


def test_augmentation_repeats_with_torch_seed(tmp_path):
    root = make_root(tmp_path)
    ds = TissueDataset(root, 'train', 'luad', mask_dirs=['train_gt'], augment='flip_blur')
    runs = []
    for _ in range(2):
        loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=True,
                                             generator=torch.Generator().manual_seed(5))
        torch.manual_seed(5)
        runs.append([batch for _ in range(3) for batch in loader])
    for a, b in zip(*runs):
        assert a['name'] == b['name'] and torch.equal(a['image'], b['image']) and torch.equal(a['masks'], b['masks'])


# ---- the reference's own fixture files -----------------------------------------------------------

def test_reads_reference_fixture_layout():
    luad = TissueDataset(FIXTURES / 'luad', 'train', 'luad',
                         mask_dirs=['ref_train_PM/PM_bn7', 'ref_train_PM/PM_b5_2', 'ref_train_PM/PM_b4_5'])
    assert luad.names == ['IHC-0-0-[1 0 0 1].png', 'IHC-288-200-[1 0 1 1].png']
    assert luad.labels.tolist() == [[1, 0, 0, 1], [1, 0, 1, 1]]
    item = luad[0]
    assert item['image'].shape == (3, 224, 224) and item['masks'].shape == (3, 224, 224)
    assert int(item['masks'].max()) == BACKGROUND
    test = TissueDataset(FIXTURES / 'luad', 'test', 'luad')
    truth = np.asarray(Image.open(FIXTURES / 'luad' / 'test' / 'mask' / 'IHC-200-100.png'))
    assert test.labels.tolist() == [[1, 0, 1, 1]] and np.array_equal(test[0]['masks'][0].numpy(), truth)
    assert TissueDataset(FIXTURES / 'bcss', 'train', 'bcss').labels.tolist() == [[1, 1, 0, 1]]
    pred = read_mask(FIXTURES / 'luad' / 'ref_pred' / 'IHC-200-100.png')  # mode L, values 0..3
    assert pred.shape == (224, 224) and pred.max() <= 3


def test_files_that_are_not_png_are_counted_and_named(tmp_path, capsys):
    folder = tmp_path / 'train'
    folder.mkdir()
    for name in ('a-[1 0 0 0].png', 'b-[0 1 0 0].png', 'c-[0 0 1 0].jpg', 'notes.txt', '.DS_Store', '._a.png',
                 'Thumbs.db'):
        (folder / name).write_bytes(b'x')
    (folder / 'sub').mkdir()  # folders are not files
    assert list_pngs(folder) == ['a-[1 0 0 0].png', 'b-[0 1 0 0].png']
    assert capsys.readouterr().out == (f'note: {folder}: 5 file(s) skipped, not .png patches or masks: '
                                       f'.DS_Store, ._a.png, Thumbs.db, ...\n')
    for name in ('a-[1 0 0 0].png', 'b-[0 1 0 0].png'):
        (folder / name).unlink()
    with pytest.raises(InputError) as info:  # patches saved as JPEG only
        list_pngs(folder)
    assert str(info.value) == (f'{folder}: no .png files (5 other file(s): .DS_Store, ._a.png, Thumbs.db, ...; '
                               f'patches and masks must be PNG)')
