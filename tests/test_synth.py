import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from tool.core.errors import InputError
from tool.data import synth
from tool.data.datasets import BACKGROUND, DATASETS, TISSUES
from tool.data.patches import TissueDataset, parse_label, read_mask
from tool.method.pseudo_mask import background_mask


def generate(out, dataset, seed=0, train=24, size=64):
    synth.main(synth.parse_args(['--out', str(out), '--dataset', dataset, '--size', str(size),
                                 '--train', str(train), '--val', '3', '--test', '2', '--seed', str(seed)]))
    return out


def digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob('*')) if p.is_file()}


@pytest.fixture(scope='module', params=['luad', 'bcss'])
def generated(request, tmp_path_factory):
    dataset = request.param
    return dataset, generate(tmp_path_factory.mktemp(dataset) / 'SYNTH', dataset)


def test_layout_and_names(generated):
    dataset, root = generated
    assert sorted(p.name for p in root.iterdir()) == ['test', 'train', 'train_gt', 'val']
    train = sorted(p.name for p in (root / 'train').iterdir())
    assert len(train) == 24 and train == sorted(p.name for p in (root / 'train_gt').iterdir())
    first = {'luad': 'synth-000000-[', 'bcss': 'SYNTH_xmin0_ymin0+0['}[dataset]
    assert train[0].startswith(first)
    other = {'luad': 'bcss', 'bcss': 'luad'}[dataset]
    with pytest.raises(InputError, match=f'{dataset}-style label'):
        parse_label(train[0], other)  # each dataset keeps its own naming style
    for split, count in (('val', 3), ('test', 2)):
        images = sorted(p.name for p in (root / split / 'img').iterdir())
        assert len(images) == count and images == sorted(p.name for p in (root / split / 'mask').iterdir())
    image = Image.open(root / 'train' / train[0])
    mask = Image.open(root / 'train_gt' / train[0])
    assert image.mode == 'RGB' and image.size == (64, 64)
    assert mask.mode == 'P' and mask.getpalette()[:15] == DATASETS[dataset].palette


def test_labels_are_the_classes_in_the_masks(generated):
    dataset, root = generated
    ds = TissueDataset(root, 'train', dataset, mask_dirs=['train_gt'])
    assert ds.labels.shape == (24, 4) and ds.labels.sum(1).min() >= 1
    backgrounds = 0
    for i, name in enumerate(ds.names):
        mask = read_mask(root / 'train_gt' / name)
        share = np.bincount(mask.ravel(), minlength=BACKGROUND + 1) / mask.size
        assert ds.labels[i].tolist() == (share[:BACKGROUND] > 0).tolist()
        present = share[:BACKGROUND][share[:BACKGROUND] > 0]
        assert present.min() >= synth.VARIANTS["default"].min_fraction and share[BACKGROUND] <= synth.MAX_BACKGROUND
        backgrounds += share[BACKGROUND] > 0
    # background (value 4, white glass) only in luad, where a good share of patches show some
    assert backgrounds == 0 if dataset == 'bcss' else backgrounds >= 4
    assert (ds.labels.sum(1) > 1).mean() > 0.4 and ds.labels.min(0).tolist() == [0] * 4  # mixed, not all
    for split in ('val', 'test'):
        assert len(TissueDataset(root, split, dataset)) == {'val': 3, 'test': 2}[split]


def test_same_seed_same_bytes_and_longer_runs_extend(tmp_path, generated):
    dataset, root = generated
    again = digests(generate(tmp_path / 'again', dataset))
    assert again == digests(root)
    longer = digests(generate(tmp_path / 'longer', dataset, train=26))
    assert {k: v for k, v in longer.items() if k in again} == again and len(longer) == len(again) + 4
    other = digests(generate(tmp_path / 'other', dataset, seed=1))
    images = [{v for k, v in run.items() if k.startswith('train/')} for run in (again, other)]
    assert not images[0] & images[1]  # (masks may repeat: a one-class mask is one colour)


def test_tissue_types_differ_in_texture():
    """Nuclei (haematoxylin-dominated pixels, bluer than red) are densest in lymphocytes, then
    tumour; stroma and necrosis have few; stroma is anisotropic (fibres), necrosis is not."""
    bank = synth.stamp_bank(0, 'luad')
    dark, anisotropy = {t: [] for t in TISSUES}, {t: [] for t in TISSUES}
    for index in range(24):
        rgb, mask = synth.make_patch(synth.patch_rng(0, 'luad', 'train', index), bank, 224, 'luad')
        gray = rgb.astype(np.float32).mean(2)
        for c, tissue in enumerate(DATASETS['luad'].tissues):
            region = mask == c
            if region.mean() > 0.3:
                dark[tissue].append((rgb[..., 2].astype(int) > rgb[..., 0])[region].mean())
                # gradient energy along the two axes of the strongest orientation, via the
                # structure tensor of the region
                gy, gx = np.gradient(gray)
                j = np.array([[np.mean(gx[region] ** 2), np.mean(gx[region] * gy[region])],
                              [np.mean(gx[region] * gy[region]), np.mean(gy[region] ** 2)]])
                low, high = np.linalg.eigvalsh(j)
                anisotropy[tissue].append(1 - low / high)
    mean = {t: np.mean(v) for t, v in dark.items()}
    assert all(len(v) >= 2 for v in dark.values())
    assert mean['lymphocytes'] > 2 * mean['tumour'] > 2 * max(mean['stroma'], mean['necrosis'])
    assert np.mean(anisotropy['stroma']) > 0.5 > 0.2 > np.mean(anisotropy['necrosis'])


def test_existing_output_and_bad_flags_are_input_errors(tmp_path):
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'x').write_text('keep me')
    for argv, problem in [(['--out', str(tmp_path / 'full')], f'{tmp_path / "full"}: exists and is not empty'),
                          (['--out', str(tmp_path / 'a'), '--train', '0'], '--train 0: need at least one'),
                          (['--out', str(tmp_path / 'a'), '--seed', '-1'], '--seed -1: must be 0 or more'),
                          (['--out', str(tmp_path / 'a'), '--size', '16'], '--size 16:'),
                          ([], '--out: give --out DIR')]:
        with pytest.raises(InputError) as info:
            synth.main(synth.parse_args(argv))
        assert str(info.value).startswith(problem)
    assert (tmp_path / 'full' / 'x').read_text() == 'keep me' and not (tmp_path / 'a').exists()
    assert [p.name for p in tmp_path.iterdir()] == ['full']  # no partial folder left behind


def test_figure_is_reproducible(tmp_path):
    for name in ('a.png', 'b.png'):
        synth.save_figure(tmp_path / name, seed=0, size=48, per_dataset=2)
    figure = Image.open(tmp_path / 'a.png')
    assert figure.mode == 'RGB' and figure.size[0] == 2 * (48 + 6) + 6
    assert (tmp_path / 'a.png').read_bytes() == (tmp_path / 'b.png').read_bytes()


@pytest.mark.parametrize('dataset', ['luad', 'bcss'])
def test_compartments_are_at_tissue_scale(dataset):
    """No connected piece of a class is smaller than MIN_PIECE of the patch: borders wander, but
    the truth has no specks that the image could not show."""
    bank = synth.stamp_bank(0, dataset)
    for index in range(24):
        _, mask = synth.make_patch(synth.patch_rng(0, dataset, 'train', index), bank, 96, dataset)
        for c in np.unique(mask):
            pieces, n = ndimage.label(mask == c)
            assert np.bincount(pieces.ravel())[1:].min() >= synth.MIN_PIECE * mask.size, (index, c)


def scipy_merge_small_pieces(mask, min_pixels):
    """merge_small_pieces as it was before OpenCV: scipy's labelling and dilation (both 4-connected)."""
    while True:
        pieces = []
        for c in np.unique(mask):
            labels, n = ndimage.label(mask == c)
            sizes = np.bincount(labels.ravel(), minlength=n + 1)
            pieces += [(sizes[i], c, labels == i) for i in range(1, n + 1) if sizes[i] < min_pixels]
        if not pieces or len(np.unique(mask)) == 1:
            return mask
        _, c, piece = min(pieces, key=lambda p: p[0])
        ring = ndimage.binary_dilation(piece) & ~piece
        mask[piece] = np.bincount(mask[ring], minlength=BACKGROUND + 1).argmax()


@pytest.mark.parametrize('seed', range(4))
def test_small_pieces_merge_as_with_scipy(seed):
    # many pieces of equal size: the order they are found in decides which merges first
    mask = np.random.default_rng(seed).integers(0, BACKGROUND + 1, (20, 30)).astype(np.uint8)
    mask = np.kron(mask, np.ones((2, 2), np.uint8)) if seed % 2 else mask
    merged = synth.merge_small_pieces(mask.copy(), 12)
    assert len(np.unique(merged)) < len(np.unique(mask)) or (merged != mask).any()
    np.testing.assert_array_equal(merged, scipy_merge_small_pieces(mask.copy(), 12))


def test_glass_and_only_glass_is_white_background_for_the_pseudo_mask_rule():
    """The reference's white-background rule (grey > 200, specks kept) finds the glass and leaves
    the tissue alone, pale necrosis and stroma included, whatever the stain strength."""
    bank = synth.stamp_bank(0, 'luad')
    glass = flagged_tissue = found_glass = tissue = 0
    for index in range(60):
        rgb, mask = synth.make_patch(synth.patch_rng(0, 'luad', 'train', index), bank, 96, 'luad')
        white = background_mask(rgb)
        glass += (mask == BACKGROUND).sum()
        found_glass += (white & (mask == BACKGROUND)).sum()
        tissue += (mask != BACKGROUND).sum()
        flagged_tissue += (white & (mask != BACKGROUND)).sum()
    assert glass > 0.05 * (glass + tissue)
    # (glass pixels at the border take some colour from the tissue through the optics blur)
    assert found_glass > 0.97 * glass and flagged_tissue < 0.001 * tissue


def test_heldout_variant_draws_other_tissue_by_the_same_rules(tmp_path):
    """`--variant heldout` (data to check a recipe on that it was not tuned on) changes what the
    patches look like, not the rules: same layout and seeds, other pixels, more mixed patches,
    smaller compartments with rougher borders, other stain colours, its own minimum share per
    class; the default is untouched by it."""
    argv = ['--dataset', 'luad', '--size', '64', '--train', '24', '--val', '3', '--test', '2']
    synth.main(synth.parse_args(['--out', str(tmp_path / 'h'), '--variant', 'heldout', *argv]))
    ours, default = digests(tmp_path / 'h'), digests(generate(tmp_path / 'd', 'luad'))
    assert len(ours) == len(default) and not {v for k, v in ours.items() if k.startswith('train/')} & \
        {v for k, v in default.items() if k.startswith('train/')}
    bank = synth.stamp_bank(0, 'luad')
    classes, pieces, border, nuclei = {}, {}, {}, {}
    for name, variant in synth.VARIANTS.items():
        measured = []
        for index in range(24):
            rgb, mask = synth.make_patch(synth.patch_rng(0, 'luad', 'train', index), bank, 96, 'luad', variant)
            share = np.bincount(mask.ravel(), minlength=BACKGROUND + 1)[:BACKGROUND] / mask.size
            assert share[share > 0].min() >= variant.min_fraction
            # optical density of the darkest tenth of the pixels: the nuclei, mostly haematoxylin
            od = -np.log(np.maximum(rgb.reshape(-1, 3), 1) / 255)
            density = od.sum(1)
            measured.append(((share > 0).sum(), sum(ndimage.label(mask == c)[1] for c in np.unique(mask)),
                             ((mask[1:] != mask[:-1]).sum() + (mask[:, 1:] != mask[:, :-1]).sum()) / mask.size,
                             od[density > np.quantile(density, 0.9)].mean(0)))
        classes[name], pieces[name], border[name] = (np.mean([m[i] for m in measured]) for i in range(3))
        colour = np.mean([m[3] for m in measured], axis=0)
        nuclei[name] = colour / np.linalg.norm(colour)
    # measured on these 24 patches: 2.17 and 1.83 classes, 3.5 and 2.8 pieces, border 0.029 and
    # 0.020 of the pixels, the nuclei's colours 13 degrees apart
    assert classes['heldout'] > classes['default'] + 0.2  # more mixed patches
    assert pieces['heldout'] > pieces['default']  # smaller compartments: more pieces a patch
    assert border['heldout'] > 1.3 * border['default']  # ... and rougher borders: longer ones
    assert np.degrees(np.arccos(nuclei['heldout'] @ nuclei['default'])) > 7  # other stain vectors
