"""Convert the ImageNet ResNet-38 MXNet weights to a PyTorch state_dict, without MXNet.

    python -m tool.core.convert_weights init_weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params \\
        init_weights/resnet38d_imagenet.pth

The output holds every network.resnet38d parameter (ImageNet classifier dropped). It loads into
the stage-1 classifier with network.resnet38_cls.load_backbone; fc8 keeps its initialisation.
"""
import argparse

import torch

from network import resnet38_cls, resnet38d
from tool.core.checkpoint import state_dict_diff
from tool.core.errors import InputError, run_cli
from tool.core.files import save_torch
from tool.core.log import log
from tool.core.mxnet_params import resnet38d_state_dict


def main(args):
    state_dict, dropped = resnet38d_state_dict(args.params)
    if 'conv1a.weight' not in state_dict:
        raise InputError(f'{args.params}: no conv1a_weight, not a ResNet-38 parameter file')
    width = state_dict['conv1a.weight'].shape[0] / 64
    with torch.device('meta'):  # shapes only: no memory, no initialisation
        backbone, classifier = resnet38d.ResNet38(width).state_dict(), resnet38_cls.CAMClassifier(width=width).state_dict()
    diff = state_dict_diff(backbone, state_dict)
    if diff:
        raise InputError(f'{args.params}: does not match ResNet-38 (width {width:g}): {diff}')
    save_torch(state_dict, args.out)
    missing = [k for k in classifier if k not in state_dict and not k.endswith('num_batches_tracked')]
    log.info(f'{args.out}: {len(state_dict)} tensors, ResNet-38 width {width:g}; '
             f'dropped from the file: {", ".join(dropped) or "nothing"}; '
             f'missing for the stage-1 classifier (left at init): {", ".join(missing)}')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('params', help='MXNet .params file (ImageNet ResNet-38)')
    parser.add_argument('out', help='output .pth (a bare state_dict)')
    parser.add_argument('--debug', action='store_true', help='show tracebacks of input errors')
    return parser.parse_args(argv)


if __name__ == '__main__':
    run_cli(main, parse_args())
