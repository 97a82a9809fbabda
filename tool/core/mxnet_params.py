"""Read MXNet `.params` files (NDArray lists) without MXNet, and rename the ImageNet ResNet-38
parameters to network.resnet38d keys.

MXNet no longer installs on current Python, and the ImageNet ResNet-38 release is such a file.
The format is plain little-endian binary, so a reader is short and runs no code from the file:

    uint64 0x112, uint64 reserved, uint64 n, n arrays, uint64 m, m names (uint64 length + bytes)

Each array starts with a header of one of three generations:
    v2     uint32 0xF993FAC9, int32 storage type (0 = dense), uint32 ndim, int64 dims
    v1     uint32 0xF993FAC8, uint32 ndim, int64 dims
    legacy uint32 ndim (no magic: 2016-era files), uint32 dims
then int32 device type, int32 device id, int32 dtype flag, and the raw data.
"""
import re
import struct

import numpy as np
import torch

from tool.core.errors import InputError

LIST_MAGIC = 0x112
V2_MAGIC = 0xF993FAC9
V1_MAGIC = 0xF993FAC8
DTYPES = {0: '<f4', 1: '<f8', 2: '<f2', 3: '|u1', 4: '<i4', 5: '|i1', 6: '<i8'}
MAX_NDIM = 32  # MXNet's own limit; a larger "ndim" means the header is not one we know


# Hand-written: MXNet, the one library that reads this format, no longer installs on current Python.
def read_params(path):
    """{name: numpy array} in file order, names as stored (e.g. 'arg:conv1a_weight')."""
    try:
        with open(path, 'rb') as f:
            return _read_list(f, path)
    except OSError as e:
        raise InputError(f'{path}: cannot read ({e.strerror})') from None


def _read_list(f, path):
    magic, _reserved = _unpack(f, '<QQ', path)
    if magic != LIST_MAGIC:
        raise InputError(f'{path}: not an MXNet .params file (magic 0x{magic:X}, expected 0x{LIST_MAGIC:X})')
    count, = _unpack(f, '<Q', path)
    arrays = [_read_array(f, path, i) for i in range(count)]
    name_count, = _unpack(f, '<Q', path)
    if name_count != count:
        raise InputError(f'{path}: {count} arrays but {name_count} names')
    names = [_read_exact(f, _unpack(f, '<Q', path)[0], path).decode('utf-8', 'replace') for _ in range(count)]
    return dict(zip(names, arrays))


def _read_array(f, path, index):
    magic, = _unpack(f, '<I', path)
    if magic == V2_MAGIC:
        storage, ndim = _unpack(f, '<iI', path)
        if storage != 0:
            raise InputError(f'{path}: array {index} is sparse (storage type {storage}); only dense arrays are supported')
        dim_format = 'q'
    elif magic == V1_MAGIC:
        ndim, = _unpack(f, '<I', path)
        dim_format = 'q'
    else:  # legacy: the first word is ndim itself, and dims are 32-bit
        ndim, dim_format = magic, 'I'
    if ndim > MAX_NDIM:
        raise InputError(f'{path}: array {index} has an unknown header (0x{magic:08X})')
    shape = _unpack(f, f'<{ndim}{dim_format}', path)
    if ndim == 0:  # MXNet's "none" array: the header ends with the shape
        return np.zeros(0, np.float32)
    _device_type, _device_id, flag = _unpack(f, '<iii', path)
    if flag not in DTYPES:
        raise InputError(f'{path}: array {index} has unsupported dtype flag {flag}')
    dtype = np.dtype(DTYPES[flag])
    data = bytearray(int(np.prod(shape)) * dtype.itemsize)  # writable, so torch can share it
    if f.readinto(data) != len(data):
        raise InputError(f'{path}: truncated (array {index} data ends early)')
    return np.frombuffer(data, dtype).astype(dtype.newbyteorder('='), copy=False).reshape(shape)


def _read_exact(f, size, path):
    data = f.read(size)
    if len(data) != size:
        raise InputError(f'{path}: truncated (file ends at byte {f.tell()})')
    return data


def _unpack(f, fmt, path):
    return struct.unpack(fmt, _read_exact(f, struct.calcsize(fmt), path))


# MXNet ResNet-38 names, after dropping 'arg:'/'aux:': res{stage}{block}_branch{X}_weight and
# bn{stage}{block}_branch{X}_{gamma,...}, where block 'a' is the stage's first block and 'b{n}'
# its n-th follower.
_BLOCK_PARAM = re.compile(r'(res|bn)(\d)(a|b\d+)_branch([0-9a-z]+)_(weight|gamma|beta|moving_mean|moving_var)')
_BN7_PARAM = re.compile(r'bn7_(gamma|beta|moving_mean|moving_var)')
_BN_NAMES = {'gamma': 'weight', 'beta': 'bias', 'moving_mean': 'running_mean', 'moving_var': 'running_var'}


def torch_key(mxnet_name):
    """The network.resnet38d key for an MXNet ResNet-38 parameter name; None for the ImageNet
    classifier (linear1000), which stage 1 replaces with fc8; ValueError for other names."""
    name = re.sub(r'^(arg|aux):', '', mxnet_name)
    if name == 'conv1a_weight':
        return 'conv1a.weight'
    if name.startswith('linear1000_'):
        return None
    if match := _BN7_PARAM.fullmatch(name):
        return 'bn7.' + _BN_NAMES[match[1]]
    if match := _BLOCK_PARAM.fullmatch(name):
        kind, stage, block, branch, leaf = match.groups()
        module = f'b{stage}' if block == 'a' else f'b{stage}_{block[1:]}'
        if kind == 'res' and leaf == 'weight':
            return f'{module}.conv_branch{branch}.weight'
        if kind == 'bn' and leaf in _BN_NAMES:
            return f'{module}.bn_branch{branch}.{_BN_NAMES[leaf]}'
    raise ValueError(f'not a ResNet-38 parameter name: {mxnet_name}')


def resnet38d_state_dict(path):
    """Read an MXNet ResNet-38 .params file as a float32 state_dict for network.resnet38d.

    Returns (state_dict, dropped MXNet names)."""
    state_dict, dropped = {}, []
    for name, array in read_params(path).items():
        try:
            key = torch_key(name)
        except ValueError as e:
            raise InputError(f'{path}: {e}') from None
        if key is None:
            dropped.append(name)
        else:
            state_dict[key] = torch.from_numpy(array.astype(np.float32, copy=False))
    return state_dict, dropped
