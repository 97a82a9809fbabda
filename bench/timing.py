"""Timing shared by the bench scripts that compare our path with a reference-style one."""
import time

from bench.bench_pseudo_mask import synchronize


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
