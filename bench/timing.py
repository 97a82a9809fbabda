"""Timing and flags shared by the bench scripts that compare our path with a reference-style one."""
import time

import torch


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
