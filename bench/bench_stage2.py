"""Stage-2 training speed: our training loop against the reference's, in images per second.

    python -m bench.bench_stage2                          # CPU, DeepLab with ResNet-18, a few minutes
    python -m bench.bench_stage2 --device cuda --backbone resnet --size 224 --batch_size 16 --patches 1600 [--amp]

Both paths train copies of one DeepLabV3+ (BatchNorm training) with the same optimiser and the
multi-layer pseudo-supervision loss on the same synthetic patches and masks (the synthetic truth
stands in for the three pseudo-masks), alternating epoch by epoch after two warm-up steps each;
the best epoch of each counts. Both load with --workers DataLoader workers, by default the
reference's 10, as on a GPU machine, capped to the CPU cores (as tool.stages.stage2 does) so that a
small machine slows neither path alone.

- ours: tool.stages.stage2.train_one_epoch with tool.stages.stage2's loader (pinned memory and non-blocking
  copies on CUDA, workers capped to the cores), channels_last and cuDNN autotuning on CUDA,
  --amp (bf16, or fp16 with loss scaling), losses read back every LOG_EVERY steps.
- reference (WSSS-Tissue's 3_train_stage2.py Trainer.training, restated): DataLoader(shuffle,
  --workers, pin_memory=False), plain blocking host-to-device copies of the image and the three masks, float32
  NCHW, and every step: the background channel built from a ones tensor made on the host and
  copied over, and two loss.item() calls (progress bar and TensorBoard).

On the CPU those per-step habits cost next to nothing, so the ratio is close to 1 there.
"""
import argparse
import copy
import os
import tempfile

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from bench.data import with_items, write_bench_dataset
from bench.timing import (add_common_args, add_workers_arg, alternating_rates, device_name, report, warm_up,
                          workers_line)
from network.deeplab import BACKBONES, DeepLab
from tool.core.runtime import MetricsLog, autocast_dtype, configure_cuda_speed, data_workers, grad_scaler, resolve_device
from tool.data.datasets import BACKGROUND
from tool.method.losses import BACKGROUND_LOGIT, IGNORE_INDEX
from tool.stages import stage2
from tool.stages.training import set_learning_rate


def reference_epoch(model, optimizer, loader, device, args, epoch):
    """One epoch the way the reference's Trainer.training runs it."""
    model.train()
    train_loss = 0.0
    for i, batch in enumerate(loader):
        image, masks = batch['image'].to(device), [m.to(device) for m in batch['masks'].unbind(1)]
        lr = stage2.learning_rate(args, epoch * len(loader) + i, args.epochs * len(loader))
        set_learning_rate(optimizer, lr, stage2.LR_SCALES)
        optimizer.zero_grad()
        output = model(image)
        one = torch.ones((output.shape[0], 1, *output.shape[2:])).to(device)
        output = torch.cat([output, BACKGROUND_LOGIT * one * (masks[0] == BACKGROUND).unsqueeze(1)], dim=1)
        losses = [F.cross_entropy(output, m, ignore_index=IGNORE_INDEX) / output.shape[0] for m in masks]
        loss = sum(w * l for w, l in zip(args.pm_weights, losses))
        loss.backward()
        optimizer.step()
        train_loss += loss.item()  # the progress bar
        loss.item()  # TensorBoard


def main(args):
    device = resolve_device(args.device)
    if device.type == 'cpu':
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = DeepLab(args.backbone, 16, num_classes=4)
    with tempfile.TemporaryDirectory() as folder:
        root = os.path.join(folder, 'synth')
        write_bench_dataset(root, args.size, args.patches, args.seed)
        train_args = stage2.get_args_parser().parse_args([
            '--dataroot', root, '--dataset', 'luad', '--batch-size', str(args.batch_size), '--workers',
            str(args.workers), '--epochs', '30', '--device', str(device), *(['--amp'] if args.amp else [])])
        our_loader = stage2.make_train_loader(train_args)
        dataset = with_items(our_loader.dataset, as_uint8=False)  # the reference's float32 items, whatever ours are
        reference_loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                      num_workers=data_workers(args.workers),
                                      pin_memory=False)
        print(f'DeepLabV3+ {args.backbone}, {args.size} px, {len(dataset)} images an epoch, batch {args.batch_size}, '
              f'{workers_line(args.workers, our_loader, reference_loader)}, {device} ({device_name(device)}), '
              f'{"ours with --amp" if args.amp else "float32"}')

        reference_model = copy.deepcopy(start).to(device)
        reference_optimizer = stage2.make_optimizer(reference_model, train_args)
        our_model = copy.deepcopy(start).to(device, memory_format=configure_cuda_speed(device))
        our_optimizer = stage2.make_optimizer(our_model, train_args)
        log = MetricsLog(os.path.join(folder, 'metrics.jsonl'))
        amp_dtype = autocast_dtype(args.amp, device)
        scaler = grad_scaler(amp_dtype)

        def reference(loader):
            torch.backends.cudnn.benchmark = False  # the reference leaves cuDNN's default
            reference_epoch(reference_model, reference_optimizer, loader, device, train_args, 0)
            return len(loader.dataset)

        def ours(loader):
            configure_cuda_speed(device)  # cuDNN autotuning back on
            stage2.train_one_epoch(our_model, our_optimizer, loader, device, 0, train_args, log, scaler, amp_dtype)
            return len(loader.dataset)

        reference(warm_up(dataset, args.batch_size))
        ours(warm_up(our_loader.dataset, args.batch_size))
        rates = alternating_rates({'reference': lambda: reference(reference_loader), 'ours': lambda: ours(our_loader)},
                                  args.repeats, device)
    report(rates, 'images/s')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_common_args(parser, patches=16, repeats_help='epochs')
    parser.add_argument('--backbone', default='resnet18', choices=BACKBONES, help="'resnet' = the reference's ResNet-101")
    parser.add_argument('--batch_size', type=int, default=4, help='the reference: 20')
    add_workers_arg(parser)
    return parser.parse_args(argv)


if __name__ == '__main__':
    main(parse_args())
