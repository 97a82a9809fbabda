"""MXNet .params reader and the ImageNet ResNet-38 conversion, without MXNet."""
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from network import resnet38d
from network.resnet38_cls import CAMClassifier
from tests.compat import FIXTURES
from tool.core import convert_weights
from tool.core.checkpoint import read_state_dict, state_dict_diff
from tool.core.errors import InputError
from tool.core.models import load_classifier_backbone
from tool.core.mxnet_params import read_params, resnet38d_state_dict, torch_key

REPO = Path(__file__).resolve().parents[1]
MXNET_FIXTURES = FIXTURES / 'mxnet'

DTYPE_FLAGS = {np.float32: 0, np.float64: 1, np.float16: 2, np.uint8: 3, np.int32: 4, np.int8: 5, np.int64: 6}


def array_bytes(array, header):
    """One NDArray as MXNet stores it, written from the format description."""
    ndim = array.ndim
    if header == 'v2':
        head = struct.pack('<IiI', 0xF993FAC9, 0, ndim) + struct.pack(f'<{ndim}q', *array.shape)
    elif header == 'v1':
        head = struct.pack('<II', 0xF993FAC8, ndim) + struct.pack(f'<{ndim}q', *array.shape)
    else:
        head = struct.pack('<I', ndim) + struct.pack(f'<{ndim}I', *array.shape)
    head += struct.pack('<iii', 1, 0, DTYPE_FLAGS[array.dtype.type])  # cpu, device 0, dtype
    return head + array.astype(array.dtype.newbyteorder('<')).tobytes()


def params_bytes(named_arrays, header):
    data = struct.pack('<QQQ', 0x112, 0, len(named_arrays))
    data += b''.join(array_bytes(a, header) for a in named_arrays.values())
    data += struct.pack('<Q', len(named_arrays))
    data += b''.join(struct.pack('<Q', len(n.encode())) + n.encode() for n in named_arrays)
    return data


def write(path, data):
    path.write_bytes(data)
    return path


def mixed_arrays():
    rng = np.random.default_rng(0)
    return {
        'arg:f32': rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        'arg:f64': rng.standard_normal(5),
        'arg:f16': rng.standard_normal((2, 3)).astype(np.float16),
        'aux:u8': rng.integers(0, 255, (3, 2), dtype=np.uint8),
        'aux:i32': rng.integers(-9, 9, 7, dtype=np.int32),
        'aux:i8': rng.integers(-9, 9, (1, 2, 2), dtype=np.int8),
        'aux:i64': np.array([2 ** 40, -3], dtype=np.int64),
    }


@pytest.mark.parametrize('which', ['mini', 'legacy', 'v1'])
def test_reads_the_fixture_files(which):
    arrays = read_params(MXNET_FIXTURES / f'resnet38_{which}.params')
    expected = np.load(MXNET_FIXTURES / f'resnet38_{which}_arrays.npz')
    assert list(arrays) == expected.files
    for name in expected.files:
        assert arrays[name].dtype == expected[name].dtype, name
        np.testing.assert_array_equal(arrays[name], expected[name])


def test_names_map_as_the_reference_converter_does():
    mapping = json.loads((MXNET_FIXTURES / 'resnet38_mini_names.json').read_text())['map']
    assert {name: torch_key(name) for name in mapping} == mapping
    state_dict, dropped = resnet38d_state_dict(MXNET_FIXTURES / 'resnet38_mini.params')
    expected = np.load(MXNET_FIXTURES / 'resnet38_mini_arrays.npz')
    assert dropped == ['arg:linear1000_weight', 'arg:linear1000_bias']
    assert list(state_dict) == [key for key in mapping.values() if key]
    for name, key in mapping.items():
        if key:
            assert state_dict[key].dtype == torch.float32  # the float16 array too
            np.testing.assert_array_equal(state_dict[key].numpy(), expected[name].astype(np.float32))


@pytest.mark.parametrize('header', ['v2', 'v1', 'legacy'])
def test_reads_files_written_per_the_format(tmp_path, header):
    arrays = mixed_arrays()
    read = read_params(write(tmp_path / 'mixed.params', params_bytes(arrays, header)))
    assert list(read) == list(arrays)
    for name, array in arrays.items():
        assert read[name].dtype == array.dtype and read[name].shape == array.shape, name
        np.testing.assert_array_equal(read[name], array)


def test_truncated_files_are_reported_with_their_name(tmp_path):
    data = params_bytes(mixed_arrays(), 'v2')
    for end in (0, 12, 30, 40, 100, len(data) - 20, len(data) - 1):
        path = write(tmp_path / f'cut{end}.params', data[:end])
        with pytest.raises(InputError, match=f'^{re.escape(str(path))}: truncated'):
            read_params(path)


def test_bad_files_are_reported_with_their_name(tmp_path):
    good = params_bytes({'arg:w': np.ones(3, np.float32)}, 'v2')
    cases = {
        'magic.params': (struct.pack('<Q', 0x113) + good[8:], 'not an MXNet .params file'),
        'sparse.params': (good[:28] + struct.pack('<i', 1) + good[32:], 'sparse'),
        'dtype.params': (good[:52] + struct.pack('<i', 12) + good[56:], 'dtype flag 12'),
        'header.params': (good[:24] + struct.pack('<I', 0xF993FACA) + good[28:], 'unknown header'),
        'names.params': (good[:68] + struct.pack('<Q', 0), '1 arrays but 0 names'),
    }
    for file_name, (data, problem) in cases.items():
        with pytest.raises(InputError, match=f'{file_name}: .*{problem}'):
            read_params(write(tmp_path / file_name, data))
    with pytest.raises(InputError, match='absent.params: cannot read'):
        read_params(tmp_path / 'absent.params')
    path = write(tmp_path / 'other.params', params_bytes({'arg:fc_weight': np.ones(3, np.float32)}, 'v2'))
    with pytest.raises(InputError, match='other.params: not a ResNet-38 parameter name: arg:fc_weight'):
        resnet38d_state_dict(path)


def mxnet_name(key):
    """Our key -> the ImageNet release's name (inverse of torch_key), to build a whole file."""
    bn_leaf = {'weight': 'gamma', 'bias': 'beta', 'running_mean': 'moving_mean', 'running_var': 'moving_var'}
    prefix = 'aux:' if 'running' in key else 'arg:'
    if key == 'conv1a.weight':
        return 'arg:conv1a_weight'
    if key.startswith('bn7.'):
        return f'{prefix}bn7_{bn_leaf[key[4:]]}'
    block, layer, leaf = key.split('.')
    stage, _, n = block[1:].partition('_')
    kind, branch = layer.split('_branch')
    mx_block = f'{stage}{"b" + n if n else "a"}_branch{branch}'
    return f'arg:res{mx_block}_weight' if kind == 'conv' else f'{prefix}bn{mx_block}_{bn_leaf[leaf]}'


def test_convert_weights_cli(tmp_path, capsys):
    torch.manual_seed(0)
    backbone = {k: v for k, v in resnet38d.ResNet38(width=0.125).state_dict().items()
                if not k.endswith('num_batches_tracked')}
    arrays = {mxnet_name(k): v.numpy() for k, v in backbone.items()}
    arrays['arg:linear1000_weight'] = np.zeros((1000, 512), np.float32)
    arrays['arg:linear1000_bias'] = np.zeros(1000, np.float32)
    params = write(tmp_path / 'imagenet.params', params_bytes(arrays, 'legacy'))

    out = tmp_path / 'imagenet.pth'
    convert_weights.main(convert_weights.parse_args([str(params), str(out)]))
    printed = capsys.readouterr().out
    assert 'dropped from the file: arg:linear1000_weight, arg:linear1000_bias' in printed
    assert printed.strip().endswith('(left at init): fc8.weight')
    converted = read_state_dict(out)
    assert state_dict_diff(CAMClassifier(width=0.125).state_dict(), converted) == '1 missing: fc8.weight [4, 512, 1, 1]'
    model = load_classifier_backbone(CAMClassifier(width=0.125), converted, out)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in backbone.items())

    cut = write(tmp_path / 'cut.params', params.read_bytes()[:-5000])
    run = subprocess.run([sys.executable, '-m', 'tool.core.convert_weights', str(cut), str(out)],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.startswith(f'error: {cut}: truncated') and run.stderr.count('\n') == 1
