"""Checkpoint safety (tool/core/checkpoint.py, issue 7): loading never runs code, a pickle that would is
refused saying so, a damaged file is reported as damaged, a checkpoint of another architecture or
class count gets a short diff of keys and shapes, and old initialisation files with numpy
scalars still load."""
import os
import pickle
import re

import numpy as np
import pytest
import torch

from network.deeplab import DeepLab
from network.resnet38_cls import CAMClassifier
from tool.core.checkpoint import load_checkpoint, load_state_dict_strict, read_state_dict, state_dict_diff
from tool.core.errors import InputError


def error_of(call, *args):
    with pytest.raises(InputError) as e:
        call(*args)
    message = str(e.value)
    assert '\n' not in message
    return message


# ---- pickles that would run code -------------------------------------------------------------------

class WritesMarker:
    """Unpickling this calls `function(argument)`: with os.system, a shell command."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


def payloads(marker):
    """Objects whose unpickling would create `marker`: through a blocked module (os) and through
    a global torch does not block by name (exec)."""
    return {'os.system': WritesMarker(os.system, f'touch {marker}'),
            'exec': WritesMarker(exec, f'open({str(marker)!r}, "w").close()')}


def save_formats(obj, path):
    """`obj` written as torch.save's zip format, its legacy format, and a bare protocol-2 pickle."""
    yield 'zip', lambda: torch.save({'state_dict': {'w': torch.zeros(2)}, 'extra': obj}, path)
    yield 'legacy', lambda: torch.save({'extra': obj}, path, _use_new_zipfile_serialization=False)
    yield 'pickle', lambda: path.write_bytes(pickle.dumps(obj, protocol=2))


@pytest.mark.parametrize('payload', ['os.system', 'exec'])
def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / 'marker'
    path = tmp_path / 'evil.pth'
    obj = payloads(marker)[payload]
    pickle.loads(pickle.dumps(obj))  # the payload works: plain unpickling creates the marker
    assert marker.exists()
    marker.unlink()
    for form, save in save_formats(obj, path):
        save()
        for load in (load_checkpoint, read_state_dict):
            message = error_of(load, str(path))
            assert message.startswith(f'{path}: refused, the checkpoint contains objects that would run code'), form
            assert 'system' in message if payload == 'os.system' else 'exec' in message
            assert 'Weights only load failed' not in message  # torch's advice to load unsafely is not passed on
        assert not marker.exists(), form


def test_a_newer_protocol_pickle_is_refused_without_running(tmp_path, recwarn):
    """pickle.dumps' default protocol frames its opcodes; torch's safe loader cannot read those at
    all and refuses the file before any object is built (and without a warning on stderr)."""
    marker = tmp_path / 'marker'
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps(payloads(marker)['os.system'], protocol=4))
    message = error_of(load_checkpoint, str(path))
    assert message.startswith(f'{path}: corrupt, or not a PyTorch checkpoint')
    assert not marker.exists() and not [w for w in recwarn if 'pickle protocol' in str(w.message)]


# ---- damaged files ----------------------------------------------------------------------------------

def test_random_bytes_are_corrupt_not_code(tmp_path):
    for seed in range(5):
        path = tmp_path / f'random{seed}.pth'
        path.write_bytes(np.random.default_rng(seed).bytes(4096))
        message = error_of(load_checkpoint, str(path))
        assert message.startswith(f'{path}: corrupt, or not a PyTorch checkpoint (Unsupported operand'), message
        assert 'run code' not in message
    page = tmp_path / 'download.pth'  # a download that fetched an error page instead
    page.write_text('<!DOCTYPE html><html><body>403 Forbidden</body></html>\n')
    assert error_of(load_checkpoint, str(page)).startswith(f'{page}: corrupt, or not a PyTorch checkpoint')


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_truncated_and_empty_checkpoints(tmp_path, zip_format):
    path = tmp_path / 'weights.pth'
    torch.save({'w': torch.arange(10000.0)}, path, _use_new_zipfile_serialization=zip_format)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 0):
        path.write_bytes(data[:cut])
        message = error_of(load_checkpoint, str(path))
        assert message.startswith(f'{path}: corrupt or truncated checkpoint'), (cut, message)


def test_missing_checkpoint(tmp_path):
    assert error_of(read_state_dict, str(tmp_path / 'none.pth')) == f'{tmp_path / "none.pth"}: checkpoint not found'


def test_a_checkpoint_without_weights_is_not_a_state_dict(tmp_path):
    path = tmp_path / 'args.pth'
    torch.save({'epoch': 3, 'best_pred': 0.5}, path)
    assert 'not a state_dict' in error_of(read_state_dict, str(path))


# ---- the wrong model --------------------------------------------------------------------------------

def diff_message(model, state_dict, path='other.pth'):
    message = error_of(load_state_dict_strict, model, state_dict, path)
    assert message.startswith(f'{path}: does not match the model: ')
    return message[len(f'{path}: does not match the model: '):]


def test_another_class_count_names_the_classifier_shapes():
    model = CAMClassifier(n_class=4, width=0.0625)
    diff = diff_message(model, CAMClassifier(n_class=5, width=0.0625).state_dict())
    assert diff == '1 wrong shape: fc8.weight: model [4, 256, 1, 1], checkpoint [5, 256, 1, 1]'


def test_another_width_gives_a_short_diff_that_says_how_much_more():
    diff = diff_message(CAMClassifier(n_class=4, width=0.0625), CAMClassifier(n_class=4, width=0.125).state_dict())
    assert diff.startswith('192 wrong shape: conv1a.weight: model [4, 3, 3, 3], checkpoint [8, 3, 3, 3]; ')
    assert diff.endswith('(+184 more)') and diff.count(': model [') == 8 and len(diff) < 1200


def test_another_architecture_lists_missing_and_unexpected_keys():
    model = DeepLab('mobilenet', num_classes=4)
    diff = diff_message(model, DeepLab('resnet18', num_classes=4).state_dict())
    parts = diff.split(' | ')
    assert [re.match(r'\d+ (missing|unexpected|wrong shape)', p).group(1) for p in parts] == \
           ['missing', 'unexpected', 'wrong shape']
    backbone = [k for k in model.backbone.state_dict() if not k.endswith('num_batches_tracked')]
    assert parts[0].startswith(f'{len(backbone)} missing: backbone.features.0.0.weight [32, 3, 3, 3]; ')
    assert parts[1].startswith('132 unexpected: backbone.conv1.weight [64, 3, 7, 7]; ')
    assert 'aspp.aspp1.atrous_conv.weight: model [256, 320, 1, 1], checkpoint [256, 512, 1, 1]' in parts[2]
    assert len(diff) < 1500  # 8 keys of each kind at most, then a count


def test_batchnorm_counters_of_old_pytorch_may_be_absent():
    model = CAMClassifier(n_class=4, width=0.0625)
    old = {k: v for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}
    assert state_dict_diff(model.state_dict(), old) == ''
    load_state_dict_strict(model, old)


# ---- numpy scalars in initialisation files ---------------------------------------------------------

def test_numpy_scalars_of_numpy_1_and_2_load(tmp_path):
    """deeplab-resnet.pth.tar keeps 'epoch' and 'best_pred' as numpy scalars, pickled by numpy 1.x
    (numpy.core.multiarray.scalar); numpy 2 pickles numpy._core. Both load, nothing else of numpy."""
    weights = {'w': torch.ones(3)}
    scalars = {'epoch': np.int64(50), 'best_pred': np.float64(0.78), 'f32': np.float32(0.5), 'flag': np.bool_(True)}
    path = tmp_path / 'init.pth.tar'
    torch.save({'state_dict': weights, **scalars}, path, _use_new_zipfile_serialization=False)
    numpy2 = path.read_bytes()
    assert b'numpy._core.multiarray\nscalar' in numpy2
    for data in (numpy2, numpy2.replace(b'numpy._core.multiarray\nscalar', b'numpy.core.multiarray\nscalar')):
        path.write_bytes(data)
        loaded = load_checkpoint(str(path))
        assert {k: loaded[k] for k in scalars} == scalars
        assert type(loaded['epoch']) is np.int64 and torch.equal(read_state_dict(str(path))['w'], weights['w'])

    torch.save({'state_dict': weights, 'table': np.arange(3)}, path)  # an array is not a scalar
    assert 'would run code' in error_of(load_checkpoint, str(path))
