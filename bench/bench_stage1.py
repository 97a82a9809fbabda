"""Stage-1 training speed: our training loop against the reference's, in images per second.

    python -m bench.bench_stage1                          # CPU, reduced network, a few minutes
    python -m bench.bench_stage1 --device cuda --width 1 --size 224 --batch_size 16 --patches 1600 [--amp]

Both paths train copies of one network from random initialisation, as `--weights none` does
(every layer and BatchNorm trains, momentum 0.9, PDA on as in 17 of the 20 epochs, with the
normalised map: with the reference's, or with frozen random layers, the network does not learn and
the bench would time a dead one), with the same optimiser on the same synthetic patches, after two
warm-up steps each, alternating epoch by epoch; the best epoch of each counts. Each path's mean
loss of its first and last epoch is printed: it falls when the network learns.
Both load with --workers DataLoader workers, by default the reference's 10, as on a GPU machine,
capped to the CPU cores (as tool.stages.stage1 does) so that a small machine slows neither path alone.

- ours: tool.stages.stage1.train_one_epoch with tool.stages.stage1's loaders (pinned memory and non-blocking
  copies on CUDA, workers capped to the cores), channels_last and cuDNN autotuning on CUDA,
  --amp (bf16, or fp16 with loss scaling), losses read back every --print_freq steps.
- reference (WSSS-Tissue's 1_train_stage1.py, restated): DataLoader(shuffle, --workers,
  pin_memory=False, drop_last), plain blocking host-to-device copies, float32 NCHW, and every step: the sigmoid
  predictions and labels copied to the host and scored image by image in Python (exact match,
  Jaccard), loss.item(), torch.cuda.empty_cache().

On the CPU those per-step habits cost next to nothing, so the ratio is close to 1 there; what
they cost is GPU idle time (each host read waits for the GPU; emptying the cache makes the next
step allocate again).
"""
import argparse
import copy
import json
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from bench.data import with_items, write_bench_dataset
from bench.timing import (add_common_args, add_workers_arg, alternating_rates, device_name, report, warm_up,
                          workers_line)
from network.resnet38_cls import CAMClassifier
from tool.core.runtime import MetricsLog, autocast_dtype, configure_cuda_speed, data_workers, grad_scaler, resolve_device
from tool.stages import stage1
from tool.stages.training import poly_lr, set_learning_rate

PDA_EPOCH = stage1.PDA_FIRST_EPOCH  # an epoch with PDA on, as most of a run is


def reference_epoch(model, optimizer, loader, device, args):
    """One epoch the way the reference's train_phase runs it, from step 0 of the poly schedule as
    ours; returns its mean loss."""
    model.train()
    exact = jaccard = seen = 0
    losses = []
    max_step = args.max_epoches * len(loader)
    for step, batch in enumerate(loader):
        set_learning_rate(optimizer, poly_lr(args.lr, step, max_step), stage1.LR_SCALES)
        labels = batch['label'].to(device, non_blocking=True)  # from pageable memory: a synchronous copy
        logits = model(batch['image'].to(device), enable_pda=True)
        probs, truth = torch.sigmoid(logits).detach().cpu().numpy(), labels.cpu().numpy()
        for p, t in zip(probs, truth):
            predicted, true = set(np.flatnonzero(p > 0.5)), set(np.flatnonzero(t == 1))
            exact += predicted == true
            jaccard += round(len(predicted & true) / len(predicted | true), 4)
            seen += 1
        loss = F.multilabel_soft_margin_loss(logits, labels)
        losses.append(loss.item())  # the reference's AverageMeter
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return np.mean(losses)


def main(args):
    device = resolve_device(args.device)
    if device.type == 'cpu':
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = CAMClassifier(4, args.width, frozen=False, pda_mode='normalised')
    with tempfile.TemporaryDirectory() as folder:
        root = os.path.join(folder, 'synth')
        write_bench_dataset(root, args.size, args.patches, args.seed)
        train_args = stage1.get_args_parser().parse_args([
            '--trainroot', os.path.join(root, 'train'), '--testroot', os.path.join(root, 'test'),
            '--dataset', 'luad', '--weights', 'none', '--lr', str(args.lr), '--batch_size', str(args.batch_size),
            '--num_workers', str(args.workers),
            '--print_freq', str(args.print_freq), '--max_epoches', '20', *(['--amp'] if args.amp else [])])
        our_loader = stage1.make_data_loaders(train_args, device)[0]
        dataset = with_items(our_loader.dataset, as_uint8=False)  # the reference's float32 items, whatever ours are
        reference_loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                      num_workers=data_workers(args.workers),
                                      pin_memory=False, drop_last=True)
        print(f'ResNet-38 width {start.width:g}, {args.size} px, {len(reference_loader) * args.batch_size} images an '
              f'epoch, batch {args.batch_size}, {workers_line(args.workers, our_loader, reference_loader)}, {device} '
              f'({device_name(device)}), {"ours with --amp" if args.amp else "float32"}')

        reference_model = copy.deepcopy(start).to(device)
        reference_optimizer = stage1.make_optimizer(reference_model, train_args)
        our_model = copy.deepcopy(start).to(device, memory_format=configure_cuda_speed(device))
        our_optimizer = stage1.make_optimizer(our_model, train_args)
        log = MetricsLog(os.path.join(folder, 'metrics.jsonl'))
        amp_dtype = autocast_dtype(args.amp, device)
        scaler = grad_scaler(amp_dtype)

        losses = {'reference': [], 'ours': []}  # mean loss of each timed epoch

        def reference(loader):
            torch.backends.cudnn.benchmark = False  # the reference leaves cuDNN's default
            losses['reference'].append(reference_epoch(reference_model, reference_optimizer, loader, device,
                                                       train_args))
            return len(loader) * args.batch_size

        def ours(loader):
            configure_cuda_speed(device)  # cuDNN autotuning back on
            stage1.train_one_epoch(our_model, our_optimizer, loader, device, PDA_EPOCH, 0, train_args, log, scaler,
                                   amp_dtype)
            with open(log.path) as f:
                losses['ours'].append(json.loads(f.readlines()[-1])['epoch_loss'])
            return len(loader) * args.batch_size

        reference(warm_up(dataset, args.batch_size))
        ours(warm_up(our_loader.dataset, args.batch_size))
        losses = {'reference': [], 'ours': []}  # the warm-up steps do not count
        rates = alternating_rates({'reference': lambda: reference(reference_loader), 'ours': lambda: ours(our_loader)},
                                  args.repeats, device)
    report(rates, 'images/s')
    print('mean loss, first and last timed epoch: ' + ', '.join(
        f'{name} {values[0]:.4f} -> {values[-1]:.4f}' for name, values in losses.items()))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_common_args(parser, patches=32, repeats_help='epochs')
    parser.add_argument('--width', type=float, default=0.25, help='ResNet-38 width (1.0 = reference)')
    parser.add_argument('--batch_size', type=int, default=4, help='the reference: 20')
    parser.add_argument('--lr', type=float, default=0.003,
                        help='base learning rate: one at which a network from scratch learns within the few timed '
                             'epochs (at 0.01 its loss still swings up and down that early)')
    add_workers_arg(parser)
    parser.add_argument('--print_freq', type=int, default=10, help='our path: read losses back every N steps')
    return parser.parse_args(argv)


if __name__ == '__main__':
    main(parse_args())
