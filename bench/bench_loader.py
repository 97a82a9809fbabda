"""Input-pipeline speed: samples per second a DataLoader worker delivers for stage-1 training
(one image, flips) and stage-2 training (an image and three pseudo-masks, flip and blur), and
where a sample's time goes.

    python -m bench.bench_loader                  # 224 px, 256 patches, 2 workers: about a minute
    python -m bench.bench_loader --workers 12     # on a GPU machine's cores

The datasets are the ones tool.stages.stage1 and tool.stages.stage2 build for training, on synthetic patches
(PNGs of about the real datasets' sizes, ~90 kB an image at 224 px) with the synthetic truth
copied as the three pseudo-masks, in shuffled batches of --batch_size as in training. Each is
timed with the items the stages use (float32 image, int64 masks) and with uint8 items
(TissueDataset(as_uint8=True), widened on the GPU by tool.data.batch_to_device).

Rates come from CPU time, not wall time, so that other processes on a shared machine change them
little: a worker's rate is 1 / (CPU seconds its process spent per sample, from fork to exit, read
with getrusage once the epoch's workers have exited); the main process's cost is its own CPU time
per sample (with workers it receives the batches and, where CUDA is available, copies them into
pinned memory, as the stages do for a GPU). Each number is measured --repeats times:
the tables show the median and [min - max]. Wall-clock rates are printed too; on a loaded
machine they are lower than the CPU-time ones.

Targets (issue 14), for 12 workers on a GPU machine: stage 2 at 1600 images/s (20% of an H200's
~790 TFLOP/s bf16 peak at ~100 GFLOP an image), i.e. 133 samples/s a worker; stage 1 at 2.5x the
reference's 213 images/s, 533/s, i.e. 44 a worker.
"""
import argparse
import os
import resource
import statistics
import tempfile
import time

import torch
from torch.utils.data import DataLoader, default_collate

from bench.data import with_items, write_bench_dataset
from tool.data.patches import blur, draw_augmentation, make_item, random_augment, read_mask, read_rgb
from tool.stages import stage1, stage2

TARGET_WORKERS = 12
TARGET_RATES = {'stage 1': 2.5 * 213, 'stage 2': 1600}  # images/s the GPU should get
ITEMS = {False: 'float32 image, int64 masks', True: 'uint8'}  # as_uint8: what the items hold
PIN_MEMORY = torch.cuda.is_available()  # as the stages load for a GPU: the main process then pins each batch


def train_datasets(root):
    """{stage: the training dataset that stage's loader reads} for the dataset under root."""
    stage1_args = stage1.get_args_parser().parse_args([
        '--trainroot', os.path.join(root, 'train'), '--testroot', os.path.join(root, 'test'), '--dataset', 'luad'])
    stage2_args = stage2.get_args_parser().parse_args(['--dataroot', root, '--dataset', 'luad', '--device', 'cpu'])
    return {'stage 1': stage1.make_data_loaders(stage1_args, torch.device('cpu'))[0].dataset,
            'stage 2': stage2.make_train_loader(stage2_args).dataset}


def cpu_seconds(who):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def cpu_ms_per_sample(step, inputs, samples, repeats):
    """[CPU ms of this process per sample] of each of `repeats` runs of step(*x) for x in inputs;
    results are dropped at once, so memory is reused as in a worker's steady state."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        for x in inputs:
            step(*x)
        times.append((time.process_time() - start) * 1e3 / samples)
    return times


class ReadyItems(torch.utils.data.Dataset):
    """Items made beforehand: a loader over them costs only collation and hand-over."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def loader_epochs(dataset, workers, batch_size, repeats):
    """{worker, main: [CPU ms per sample], wall: [samples/s]} of `repeats` shuffled epochs."""
    runs = {'worker': [], 'main': [], 'wall': []}
    for _ in range(repeats):
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                            pin_memory=PIN_MEMORY)
        children, main, start = cpu_seconds(resource.RUSAGE_CHILDREN), time.process_time(), time.perf_counter()
        samples = sum(len(batch['label']) for batch in loader)  # an exhausted loader joins its workers
        wall = time.perf_counter() - start
        runs['worker'].append((cpu_seconds(resource.RUSAGE_CHILDREN) - children) * 1e3 / samples)
        runs['main'].append((time.process_time() - main) * 1e3 / samples)
        runs['wall'].append(samples / wall)
    return runs


def breakdown(dataset, args):
    """{step: [CPU ms per sample]}: the steps of dataset[i], each timed alone over every patch in
    this process, for both item formats where they differ; and the whole DataLoader with no
    workers."""
    paths = [(os.path.join(dataset.image_dir, name), [os.path.join(dataset.root, d, name) for d in dataset.mask_dirs])
             for name in dataset.names]
    decoded = [(read_rgb(image), [read_mask(m) for m in masks]) for image, masks in paths]
    torch.manual_seed(args.seed)
    radii = [draw_augmentation(dataset.augment)[2] for _ in paths]
    torch.manual_seed(args.seed)  # random_augment draws the same
    augmented = [random_augment(image, masks, dataset.augment) for image, masks in decoded]
    steps = {
        'decode image (PNG)': (read_rgb, [(image,) for image, _ in paths]),
        'decode masks (PNGs)': (read_mask, [(m,) for _, masks in paths for m in masks]),
        'augmentation (flips, blur)': (random_augment, [(image, masks, dataset.augment) for image, masks in decoded]),
        '... of which blur (p = 0.5)': (blur, [(image, r) for (image, _), r in zip(decoded, radii) if r is not None]),
    }
    rows = {name: cpu_ms_per_sample(step, inputs, len(paths), args.repeats) for name, (step, inputs) in steps.items()}
    label = dataset.labels[0]
    for as_uint8, items_name in ITEMS.items():
        inputs = [(name, image, label, masks, as_uint8) for name, (image, masks) in zip(dataset.names, augmented)]
        items = [make_item(*x) for x in inputs]
        batches = [(items[i:i + args.batch_size],) for i in range(0, len(items) - args.batch_size + 1, args.batch_size)]
        rows[f'to tensors: {items_name}'] = cpu_ms_per_sample(make_item, inputs, len(paths), args.repeats)
        rows[f'collation: {items_name}'] = cpu_ms_per_sample(default_collate, batches, len(paths), args.repeats)
        rows[f'collation + hand-over in a worker: {items_name}'] = loader_epochs(
            ReadyItems(items), args.workers, args.batch_size, args.repeats)['worker']
    rows['DataLoader, no workers (all but the hand-over): float32 image, int64 masks'] = loader_epochs(
        dataset, 0, args.batch_size, args.repeats)['main']
    return rows


def spread(values, digits=2):
    return f'{statistics.median(values):.{digits}f} [{min(values):.{digits}f} - {max(values):.{digits}f}]'


def print_breakdown(rows):
    stages = list(rows)
    print('\nWhere a sample\'s time goes: CPU ms per sample (median [min - max])')
    print(f'| step | {" | ".join(stages)} |\n|---|{"---|" * len(stages)}')
    for step in rows[stages[-1]]:
        print(f'| {step} | ' + ' | '.join(spread(rows[s][step]) if max(rows[s][step]) > 0.0005 else '-'
                                          for s in stages) + ' |')


def print_loader(runs, args):
    print(f'\nDataLoader with {args.workers} workers, batch {args.batch_size} (median [min - max] of {args.repeats} '
          f'epochs; needed a worker: the target rate over {TARGET_WORKERS} workers)')
    print('| stage | items | worker CPU ms/sample | samples/s a worker | needed a worker | margin '
          '| main process CPU ms/sample | wall samples/s, all workers |\n|---|---|---|---|---|---|---|---|')
    for (stage, as_uint8), run in runs.items():
        rates = [1e3 / ms for ms in run['worker']]
        needed = TARGET_RATES[stage] / TARGET_WORKERS
        print(f'| {stage} | {ITEMS[as_uint8]} | {spread(run["worker"])} | {spread(rates, 0)} | {needed:.0f} | '
              f'{statistics.median(rates) / needed:.1f}x | {spread(run["main"])} | {spread(run["wall"], 0)} |')


def main(args):
    torch.set_num_threads(1)  # as in a DataLoader worker
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        root = os.path.join(folder, 'synth')
        write_bench_dataset(root, args.size, args.patches, args.seed)
        datasets = train_datasets(root)
        print(f'{args.patches} synthetic patches of {args.size} px, batch {args.batch_size}, {args.workers} loader '
              f'workers, {os.cpu_count()} CPUs, torch {torch.__version__}, pinned memory: {PIN_MEMORY}; CPU time, '
              f'{args.repeats} repeats')
        print_breakdown({stage: breakdown(dataset, args) for stage, dataset in datasets.items()})
        print_loader({(stage, as_uint8): loader_epochs(with_items(dataset, as_uint8), args.workers, args.batch_size,
                                                       args.repeats)
                      for stage, dataset in datasets.items() for as_uint8 in ITEMS}, args)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--patches', type=int, default=256, help='patches in the synthetic training set')
    parser.add_argument('--size', type=int, default=224, help='patch size (the datasets: 224)')
    parser.add_argument('--batch_size', type=int, default=16)
    parser.add_argument('--workers', type=int, default=2, help='DataLoader workers (this machine: 2 cores)')
    parser.add_argument('--repeats', type=int, default=3, help='runs of each measurement')
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args(argv)


if __name__ == '__main__':
    main(parse_args())
