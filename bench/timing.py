"""Timing and flags shared by the bench scripts that compare our path with a reference-style one."""
import time

import torch
from torch.utils.data import DataLoader, Subset


def synchronize(device):
    """Wait for the GPU's queued work, so that a timer reads what the work took."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def device_name(device):
    """What the rates were measured on: the CPU threads or the GPU model."""
    return f'{torch.get_num_threads()} threads' if device.type == 'cpu' else torch.cuda.get_device_name(device)


def alternating_rates(paths, repeats, device):
    """{name: [items per second of each repeat]} for paths {name: run() -> number of items},
    run in turn, so that a change in the machine's load (other processes) hits every path."""
    rates = {name: [] for name in paths}
    for _ in range(repeats):
        for name, run in paths.items():
            synchronize(device)
            start = time.perf_counter()
            items = run()
            synchronize(device)
            rates[name].append(items / (time.perf_counter() - start))
    return rates


def report(rates, unit):
    """Print the best rate of each path (every repeat in brackets) and ours / reference."""
    for name, values in rates.items():
        print(f'{name:<12}{max(values):9.2f} {unit}  (each run: {", ".join(f"{v:.2f}" for v in values)})')
    print(f'ratio ours / reference: {max(rates["ours"]) / max(rates["reference"]):.2f}x')


def add_common_args(parser, patches, repeats_help):
    """The flags every stage benchmark takes."""
    parser.add_argument('--patches', type=int, default=patches, help='patches timed per run')
    parser.add_argument('--repeats', type=int, default=2, help=f'{repeats_help} timed per path (the best counts)')
    parser.add_argument('--size', type=int, default=112, help='patch size (the datasets: 224)')
    parser.add_argument('--amp', action='store_true', help='our path: mixed precision (CUDA only)')
    parser.add_argument('--device', default='cpu', help='cpu, cuda or auto')
    parser.add_argument('--threads', type=int, default=2, help='CPU threads')
    parser.add_argument('--seed', type=int, default=0)


def add_workers_arg(parser):
    """--workers of the training benchmarks: by default the reference's 10, as on a GPU machine."""
    parser.add_argument('--workers', type=int, default=10,
                        help="DataLoader workers of both paths (default: the reference's 10, what a GPU machine "
                             "runs), capped to the CPU cores as in training. Each epoch starts its "
                             "workers anew, as in training: on a GPU, give an epoch enough batches (--patches "
                             "1600 at batch 16) that their start is a small part of it. On a 2-core CPU, "
                             "--workers 0 gives the steadiest numbers")


def workers_line(requested, ours, reference):
    """How many loader workers were asked for and each path's DataLoader runs."""
    return (f'--workers {requested} (the reference\'s 10 by default), running: ours {ours.num_workers}, '
            f'reference {reference.num_workers}')


def warm_up(dataset, batch_size):
    """Two batches of the dataset's first patches, for the steps before timing."""
    return DataLoader(Subset(dataset, range(2 * batch_size)), batch_size=batch_size)
