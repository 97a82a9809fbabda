"""The whole pipeline (tool/pipeline/runner.py) in its quick configuration: a tiny synthetic dataset,
every stage script as a child process, the run folder, the summary and the contact sheet."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tool.core.errors import InputError
from tool.data.datasets import DATASETS
from tool.data.patches import list_pngs
from tool.method.paper_layers import PAPER_LAYERS
from tool.pipeline import runner
from tool.pipeline.contact_sheet import COLUMNS, GAP, MIN_TILE, TEXT_HEIGHT, choose_patches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = runner.CONFIGS['quick']['synthetic']
STAGES = ('data', 'stage1', 'pseudo_masks', 'pseudo_masks_val', 'stage2', 'ablation_bn7', 'fully_supervised',
          'predictions')
LOGS = ('data', 'stage1-restart-0', 'stage1-restart-1', 'pseudo_masks_val-restart-0', 'pseudo_masks_val-restart-1',
        'pseudo_masks', 'stage2', 'ablation_bn7', 'fully_supervised', 'test_predictions', 'train_predictions')


def run_pipeline(*args):
    return subprocess.run([sys.executable, '-m', 'tool.pipeline', *args], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """One quick run (about a minute on one core) shared by the tests below: (folder, stdout)."""
    folder = str(tmp_path_factory.mktemp('pipeline') / 'run')
    result = run_pipeline('--quick', '--out', folder, '--sheet_patches', '3')
    assert result.returncode == 0, result.stdout + result.stderr
    return folder, result.stdout


def read_json(*path):
    with open(os.path.join(*path)) as f:
        return json.load(f)


@pytest.mark.slow
def test_run_folder_holds_every_stage(run):
    folder, _ = run
    for name in ('run_args.json', 'summary.json', 'summary.md', 'contact_sheet.png',
                 'stage1/stage1_checkpoint_trained_on_luad.pth', 'stage1/stage1_val_metrics.json',
                 'stage1/stage1_test_metrics.json', 'pseudo_masks/pseudo_mask_metrics.json',
                 'pseudo_masks_val/pseudo_mask_metrics.json', 'stage2/stage2_checkpoint_trained_on_luad.pth',
                 'stage2/test_metrics.json', 'fully_supervised/test_metrics.json', 'ablation_bn7/test_metrics.json',
                 'test_predictions/metrics.json', 'train_predictions/metrics.json',
                 *[f'logs/{stage}.log' for stage in LOGS]):
        assert os.path.isfile(os.path.join(folder, name)), name
    for name in [*runner.RESUME_FILES, 'stage1_restarts/restart-0/stage1_resume.pth',
                 'stage1_restarts/restart-1/stage1_resume.pth']:  # only needed to continue an interrupted training
        assert not os.path.exists(os.path.join(folder, name)), name
    # Each log starts with the command line of its stage.
    with open(os.path.join(folder, 'logs', 'stage2.log')) as f:
        first = f.readline()
    assert first.startswith('$ ') and '3_train_stage2.py' in first and '--supervision multilayer' in first
    record = read_json(folder, 'run_args.json')
    assert record['args']['config'] == 'quick' and record['args']['out'] == folder
    assert record['args']['config_flags'] == runner.CONFIGS['quick'] and 'torch' in record['versions']
    # A pseudo-mask per training patch and layer; the run's masks are what stage 2 read (data/train_PM).
    train = list_pngs(os.path.join(folder, 'synthetic', 'train'))
    assert len(train) == QUICK['train']
    val = list_pngs(os.path.join(folder, 'synthetic', 'val', 'img'))
    for layer in PAPER_LAYERS:
        assert list_pngs(os.path.join(folder, 'pseudo_masks', f'PM_{layer}')) == train
        assert list_pngs(os.path.join(folder, 'pseudo_masks_val', f'PM_{layer}')) == val
    assert os.path.realpath(os.path.join(folder, 'data', 'train_PM')) == os.path.realpath(
        os.path.join(folder, 'pseudo_masks'))
    assert len(list_pngs(os.path.join(folder, 'test_predictions', 'masks'))) == QUICK['test']
    # The baseline trained on the pixel truth, the weakly supervised model on the pseudo-masks.
    assert read_json(folder, 'fully_supervised', 'stage2_run_args.json')['args']['supervision'] == 'gt'
    assert read_json(folder, 'stage2', 'stage2_run_args.json')['args']['supervision'] == 'multilayer'
    assert read_json(folder, 'ablation_bn7', 'stage2_run_args.json')['args']['supervision'] == 'bn7'
    # every stage-2 training got the run's seed; stage 1 the kept restart's
    assert {read_json(folder, f, 'stage2_run_args.json')['args']['seed']
            for f in ('stage2', 'ablation_bn7', 'fully_supervised')} == {0}
    kept = next(r for r in read_json(folder, 'stage1_restarts', 'restarts.json') if r['kept'])
    assert read_json(folder, 'stage1', 'stage1_args.json')['args']['seed'] == kept['seed']


@pytest.mark.slow
def test_stage1_keeps_the_restart_whose_val_pseudo_masks_score_best(run):
    """Two stage-1 trainings at seeds 0 and 1000; the one with the best val pseudo-masks, the
    three layers weighted as the stage-2 loss weights them, is the run's stage 1 (its checkpoint,
    CAM scores and val pseudo-masks), the other stays in stage1_restarts/."""
    folder, stdout = run
    restarts = read_json(folder, 'stage1_restarts', 'restarts.json')
    assert [(r['restart'], r['seed']) for r in restarts] == [(0, 0), (1, 1000)]
    assert [r['kept'] for r in restarts].count(True) == 1
    kept = next(r for r in restarts if r['kept'])
    other = restarts[1 - kept['restart']]
    assert kept['pm_val_weighted'] >= other['pm_val_weighted']
    assert read_json(folder, 'stage1', 'stage1_val_metrics.json')['miou'] == kept['cam_val']
    val_layers = read_json(folder, 'pseudo_masks_val', 'pseudo_mask_metrics.json')['layers']
    assert {layer: val_layers[layer]['miou'] for layer in PAPER_LAYERS} == kept['pm_val']
    assert kept['pm_val_weighted'] == pytest.approx(sum(w * kept['pm_val'][layer] for layer, w in PAPER_LAYERS.items()))
    name = f'restart-{other["restart"]}'
    assert read_json(folder, 'stage1_restarts', name, 'stage1_val_metrics.json')['miou'] == other['cam_val']
    assert read_json(folder, 'stage1_restarts', name, 'stage1_args.json')['args']['seed'] == other['seed']
    assert os.path.isfile(os.path.join(folder, 'stage1_restarts', name, 'stage1_checkpoint_trained_on_luad.pth'))
    # the classifier stage 2 was gated with and trained on is the kept one
    assert read_json(folder, 'pseudo_masks', 'generate_pm_args.json')['args']['weights'].startswith(
        os.path.join(folder, 'stage1', ''))
    assert f'stage 1 kept restart {kept["restart"]} (seed {kept["seed"]}) of 2' in stdout


def test_the_first_of_equally_good_restarts_is_kept(tmp_path):
    run = str(tmp_path)
    names = ['stage1_restarts/restart-0', 'stage1_restarts/restart-1', 'stage1_restarts/restart-2']
    # (CAM val, then val pseudo-masks b4_5, b5_2, bn7); weighted 0.2, 0.2, 0.6: 0.5, 0.48, 0.5
    for name, (cam, *scores) in zip(names, [(0.1, 0.5, 0.5, 0.5), (0.9, 0.9, 0.9, 0.2), (0.2, 0.5, 0.5, 0.5)]):
        os.makedirs(os.path.join(run, name))
        os.makedirs(os.path.join(run, runner.val_masks_folder(name)))
        with open(os.path.join(run, name, 'stage1_val_metrics.json'), 'w') as f:
            json.dump({'miou': cam}, f)
        with open(os.path.join(run, runner.val_masks_folder(name), 'pseudo_mask_metrics.json'), 'w') as f:
            json.dump({'layers': {layer: {'miou': v} for layer, v in zip(PAPER_LAYERS, scores)}}, f)
    # restart 0: the first of the two best, although 1 has the best CAMs and shallow layers
    runner.keep_best_restart(run, names, seed=7)
    records = read_json(run, 'stage1_restarts', 'restarts.json')
    assert [r['kept'] for r in records] == [True, False, False] and [r['seed'] for r in records] == [7, 1007, 2007]
    assert [r['pm_val_weighted'] for r in records] == pytest.approx([0.5, 0.48, 0.5])
    assert read_json(run, 'stage1', 'stage1_val_metrics.json')['miou'] == 0.1
    assert read_json(run, 'pseudo_masks_val', 'pseudo_mask_metrics.json')['layers']['bn7']['miou'] == 0.5
    assert sorted(os.listdir(os.path.join(run, 'stage1_restarts'))) == [
        'restart-1', 'restart-1-pseudo_masks_val', 'restart-2', 'restart-2-pseudo_masks_val', 'restarts.json']


@pytest.mark.slow
def test_summary_repeats_what_the_stages_measured(run):
    folder, _ = run
    summary = read_json(folder, 'summary.json')
    assert summary['config'] == 'quick' and summary['dataset'] == 'luad'
    scores = [summary['stage1_cam_val'], summary['stage1_cam_test'], *summary['pseudo_masks_val'].values(),
              *summary['pseudo_masks_train'].values(), summary['stage2_val'], summary['stage2_train'],
              *summary['stage2_test'].values(), summary['ablation_bn7_test'], summary['fully_supervised_test']]
    assert len(scores) == 2 + 3 + 3 + 2 + 3 + 1 + 1
    for s in scores:
        assert set(s) == {'miou', 'fwiou'} and 0 <= s['miou'] <= 1 and 0 <= s['fwiou'] <= 1
    for split in ('val', 'test'):
        cams = read_json(folder, 'stage1', f'stage1_{split}_metrics.json')
        assert summary[f'stage1_cam_{split}']['miou'] == cams['miou'] and cams['split'] == split
    # the val patches' pseudo-masks are scored against val/mask, all of them
    val_record = read_json(folder, 'pseudo_masks_val', 'pseudo_mask_metrics.json')
    assert val_record['split'] == 'val' and val_record['truth'] == 'val/mask' and val_record['patches'] == QUICK['val']
    assert summary['pseudo_masks_val']['PM_b5_2']['fwiou'] == val_record['layers']['b5_2']['fwiou']
    layers = read_json(folder, 'pseudo_masks', 'pseudo_mask_metrics.json')['layers']
    assert summary['pseudo_masks_train']['PM_bn7']['miou'] == layers['bn7']['miou']
    # stage 2's val score is its best epoch's, the first of equal ones, which is the checkpoint it tested
    with open(os.path.join(folder, 'stage2', 'metrics.jsonl')) as f:
        val_epochs = [r for r in map(json.loads, f) if r.get('split') == 'val']
    best = max(val_epochs, key=lambda r: r['miou'])
    assert summary['stage2_val'] == {'miou': best['miou'], 'fwiou': best['fwiou']}
    checkpoint = torch.load(os.path.join(folder, 'stage2', 'stage2_checkpoint_trained_on_luad.pth'),
                            map_location='cpu', weights_only=True)
    assert (checkpoint['epoch'], checkpoint['best_pred']) == (best['epoch'], best['miou'])
    modes = read_json(folder, 'stage2', 'test_metrics.json')['modes']
    assert set(summary['stage2_test']) == {'no_gate', 'gate_multiply', 'gate_mask'}
    assert summary['stage2_test']['gate_mask']['fwiou'] == modes['gate_mask']['fwiou']
    fully = read_json(folder, 'fully_supervised', 'test_metrics.json')['modes']['no_gate']['miou']
    weakly = modes['no_gate']['miou']
    assert summary['gap_points'] == round(100 * (fully - weakly), 2)
    # 4_infer.py on the test patches with the same checkpoint reproduces stage 2's own test.
    assert read_json(folder, 'test_predictions', 'metrics.json')['miou'] == pytest.approx(weakly, abs=1e-6)
    assert summary['stage2_train']['miou'] == read_json(folder, 'train_predictions', 'metrics.json')['miou']
    ablation = read_json(folder, 'ablation_bn7', 'test_metrics.json')['modes']
    assert summary['ablation_bn7_test']['miou'] == ablation['no_gate']['miou'] and set(ablation) == {'no_gate'}
    assert summary['class_iou_test'] == {
        name: read_json(folder, name, 'test_metrics.json')['modes']['no_gate']['iou']
        for name in ('stage2', 'ablation_bn7', 'fully_supervised')}
    # Every stage timed; the chain ran one stage after another, the baseline beside it; each stage
    # needed CPU time (a stage script starting Python and torch alone takes a second).
    times = summary['times']
    assert set(times) == {*STAGES, 'total'}
    assert all(set(t) == {'wall_s', 'cpu_s'} and t['wall_s'] > 0 and t['cpu_s'] > 0.5 for t in times.values())
    chain = ('data', 'stage1', 'pseudo_masks', 'stage2', 'predictions')
    assert sum(times[stage]['wall_s'] for stage in chain) <= times['total']['wall_s'] + 0.5
    # the baseline, then the ablation, beside the chain: together no longer than the whole run
    beside = times['fully_supervised']['wall_s'] + times['ablation_bn7']['wall_s']
    assert beside <= times['total']['wall_s'] + 0.5 and summary['alongside'] is True
    assert sum(times[stage]['cpu_s'] for stage in STAGES) <= times['total']['cpu_s'] + 0.5


def markdown_tables(text):
    """The Markdown tables in `text`, in order: each a list of rows of stripped cells, the
    alignment line left out."""
    tables, table = [], None
    for line in text.splitlines():
        if not line.startswith('|'):
            table = None
            continue
        cells = [c.strip() for c in line.strip()[1:-1].split('|')]
        if table is None:
            table = []
            tables.append(table)
        if not all(c and set(c) <= set('-:') for c in cells):
            table.append(cells)
    return tables


def number(cell):
    """A table cell as a number; None where it is empty or 'n/a'. A note after the number, as in
    '34.9 (beside stage 2)', is left out."""
    value = cell.split(' (')[0]
    return None if value in ('', 'n/a') else float(value)


def stage2_minus_other(sentence):
    """'... is 1.50 MIoU points below ...' -> -1.5: the findings say where stage 2 stands against
    another result, in MIoU points."""
    found = re.search(r' is (\d+\.\d\d) (?:MIoU )?points (above|below) ', sentence)
    assert found, sentence
    return float(found[1]) if found[2] == 'above' else -float(found[1])


def iou_values(metrics):
    return [v for v in metrics['iou'].values() if v is not None]  # None: a class in neither truth nor prediction


HALF = 5e-5  # half the last place of a 4-decimal score
VAL_STAGE2 = 'val, best epoch (the checkpoint tested)'


@pytest.mark.slow
def test_summary_table_gives_the_numbers_the_stages_wrote(run):
    folder, stdout = run
    with open(os.path.join(folder, 'summary.md')) as f:
        markdown = f.read()
    table = markdown[markdown.index('| stage |'):]
    assert table.strip() in stdout  # the same table ends the printed output
    results, class_iou = markdown_tables(markdown)
    assert results[0] == ['stage', 'result', 'MIoU', 'FwIoU', 'wall (s)', 'CPU (s)']
    rows = {cells[1]: [number(c) for c in cells[2:]] for cells in results[1:]}
    # Scores: what each stage wrote in its own metrics file, at 4 decimals, in [0, 1], and
    # consistent with that stage's per-class IoU (MIoU their mean, FwIoU a weighted mean).
    stage2 = read_json(folder, 'stage2', 'test_metrics.json')['modes']
    layers = read_json(folder, 'pseudo_masks', 'pseudo_mask_metrics.json')['layers']
    train = read_json(folder, 'train_predictions', 'metrics.json')
    ablation = read_json(folder, 'ablation_bn7', 'test_metrics.json')['modes']['no_gate']
    fully = read_json(folder, 'fully_supervised', 'test_metrics.json')['modes']['no_gate']
    val_layers = read_json(folder, 'pseudo_masks_val', 'pseudo_mask_metrics.json')['layers']
    summary = read_json(folder, 'summary.json')
    written = {
        'CAM, val patches': read_json(folder, 'stage1', 'stage1_val_metrics.json'),
        'CAM, test patches': read_json(folder, 'stage1', 'stage1_test_metrics.json'),
        **{f'PM_{layer}, val patches vs val/mask': val_layers[layer] for layer in PAPER_LAYERS},
        **{f'PM_{layer}, train patches vs train_gt (diagnostic)': layers[layer] for layer in PAPER_LAYERS},
        'train patches vs train_gt (diagnostic: what it learnt from)': train,
        'test, no gate': stage2['no_gate'],
        'test, gate (multiply, reference)': stage2['gate_multiply'],
        'test, gate (mask)': stage2['gate_mask'],
        'stage 2 on PM_bn7 alone (--supervision bn7); test, no gate': ablation,
        'same model, data and budget, train_gt (diagnostic); test, no gate': fully,
    }
    assert {result for result, values in rows.items() if values[0] is not None} == {*written, VAL_STAGE2}
    miou, fwiou = rows[VAL_STAGE2][:2]  # stage 2's best val epoch (per-class IoU: in metrics.jsonl)
    assert abs(miou - summary['stage2_val']['miou']) <= HALF and abs(fwiou - summary['stage2_val']['fwiou']) <= HALF
    for result, metrics in written.items():
        miou, fwiou = rows[result][:2]
        assert 0 <= miou <= 1 and 0 <= fwiou <= 1, result
        assert abs(miou - metrics['miou']) <= HALF and abs(fwiou - metrics['fwiou']) <= HALF, result
        iou = iou_values(metrics)
        assert metrics['miou'] == pytest.approx(np.mean(iou), abs=1e-12), result
        assert min(iou) - 1e-12 <= metrics['fwiou'] <= max(iou) + 1e-12, result
    # Times: each stage's on its first row, as the run measured them (0.1 s).
    times = read_json(folder, 'summary.json')['times']
    timed = {'dataset': 'data', 'CAM, val patches': 'stage1', 'PM_b4_5, val patches vs val/mask': 'pseudo_masks_val',
             'PM_b4_5, train patches vs train_gt (diagnostic)': 'pseudo_masks', VAL_STAGE2: 'stage2',
             'stage 2 on PM_bn7 alone (--supervision bn7); test, no gate': 'ablation_bn7',
             'same model, data and budget, train_gt (diagnostic); test, no gate': 'fully_supervised',
             'predictions of the test and train patches, contact sheet': 'predictions', 'all of the above': 'total'}
    rows = {('dataset' if result.startswith('dataset ') else result): values for result, values in rows.items()}
    assert {result for result, values in rows.items() if values[2] is not None} == set(timed)
    for result, stage in timed.items():
        wall, cpu = rows[result][2:]
        assert (wall, cpu) == pytest.approx((times[stage]['wall_s'], times[stage]['cpu_s']), abs=0.051), result
        assert 0 < wall <= rows['all of the above'][2] and 0 < cpu <= rows['all of the above'][3], result
    # The findings: stage 2 (no gate) against full supervision, its best pseudo-masks on the
    # training patches, and PM_bn7 alone, in points (2 decimals) from the stages' files.
    findings = [line for line in table.splitlines() if line and not line.startswith('|')]
    assert findings[-1] == runner.DIAGNOSTIC  # says which rows a real dataset cannot give
    restarts = read_json(folder, 'stage1_restarts', 'restarts.json')
    kept = next(r for r in restarts if r['kept'])
    assert findings[0] == (f'stage 1 kept restart {kept["restart"]} (seed {kept["seed"]}) of 2: loss-weighted val '
                           f'pseudo-masks {restarts[0]["pm_val_weighted"]:.4f}, {restarts[1]["pm_val_weighted"]:.4f}, '
                           f'CAMs on val {restarts[0]["cam_val"]:.4f}, {restarts[1]["cam_val"]:.4f}')
    gap, own, loss = map(stage2_minus_other, findings[1:-1])
    weak = stage2['no_gate']['miou']
    assert gap == pytest.approx(100 * (weak - fully['miou']), abs=0.0051)
    best = max(PAPER_LAYERS, key=lambda layer: layers[layer]['miou'])
    assert findings[2].endswith(f'its best pseudo-masks (PM_{best})')
    assert own == pytest.approx(100 * (train['miou'] - layers[best]['miou']), abs=0.0051)
    assert loss == pytest.approx(100 * (weak - ablation['miou']), abs=0.0051)
    # Per-class IoU of the three stage-2 models on the test patches, whose mean is the table's MIoU.
    assert class_iou[0] == ['test, no gate: IoU', *stage2['no_gate']['iou']]
    models = {'stage 2 (multi-layer)': (stage2['no_gate'], 'test, no gate'),
              'stage 2 on PM_bn7 alone': (ablation, 'stage 2 on PM_bn7 alone (--supervision bn7); test, no gate'),
              'fully supervised': (fully, 'same model, data and budget, train_gt (diagnostic); test, no gate')}
    assert [cells[0] for cells in class_iou[1:]] == list(models)
    for name, *cells in class_iou[1:]:
        metrics, result = models[name]
        values = [number(c) for c in cells]
        assert len(values) == len(metrics['iou']) and all(0 <= v <= 1 for v in values if v is not None), name
        for value, expected in zip(values, metrics['iou'].values()):
            assert (value is None) if expected is None else abs(value - expected) <= HALF, name
        assert np.mean([v for v in values if v is not None]) == pytest.approx(rows[result][0], abs=2 * HALF), name


@pytest.mark.slow
def test_contact_sheet_shows_three_test_patches_in_six_columns(run):
    folder, _ = run
    sheet = np.asarray(Image.open(os.path.join(folder, 'contact_sheet.png')).convert('RGB'))
    tile = MIN_TILE  # the 32 px patches are enlarged 4 times
    assert sheet.shape == (TEXT_HEIGHT + 3 * (tile + GAP) + 2 * TEXT_HEIGHT, len(COLUMNS) * (tile + GAP) - GAP, 3)
    palette = np.asarray(DATASETS['luad'].palette).reshape(-1, 3)
    for column in range(1, len(COLUMNS)):  # truth, three pseudo-masks, prediction: palette colours only
        x = column * (tile + GAP)
        colours = np.unique(sheet[TEXT_HEIGHT:TEXT_HEIGHT + tile, x:x + tile].reshape(-1, 3), axis=0)
        assert all((palette == c).all(axis=1).any() for c in colours), COLUMNS[column]
    # The prediction column is the stage-2 mask of a test patch, enlarged, with the glass of the
    # truth (not scored) shown as background.
    names = sorted(list_pngs(os.path.join(folder, 'synthetic', 'test', 'img')))
    masks = [np.where(np.asarray(Image.open(os.path.join(folder, 'synthetic', 'test', 'mask', n))) == 4, 4,
                      np.asarray(Image.open(os.path.join(folder, 'test_predictions', 'masks', n)))) for n in names]
    x = (len(COLUMNS) - 1) * (tile + GAP)
    shown = sheet[TEXT_HEIGHT:TEXT_HEIGHT + tile:4, x:x + tile:4]
    assert any((palette[m] == shown).all() for m in masks)


@pytest.mark.slow
def test_existing_run_folder_is_refused(run):
    folder, _ = run
    result = run_pipeline('--quick', '--out', folder)
    assert result.returncode == 2
    assert result.stderr.strip() == f'error: {folder}: the run folder exists already; choose another --out'


@pytest.mark.slow
def test_a_failing_stage_stops_the_run_and_names_its_log(tmp_path):
    folder = str(tmp_path / 'run')
    result = run_pipeline('--quick', '--out', folder, '--stage1_args=--no_such_flag')
    assert result.returncode == 2
    log = os.path.join(folder, 'logs', 'stage1-restart-0.log')
    expected = (r"error: stage1-restart-0 failed \(exit status 2\) after \d+ s; its last line: '1_train_stage1.py: error: "
                r"unrecognized arguments: --no_such_flag'; the whole output: " + re.escape(log))
    assert re.fullmatch(expected, result.stderr.strip()), result.stderr
    # Nothing after stage 1 ran, and the baseline that had started beside it was stopped.
    assert not os.path.exists(os.path.join(folder, 'pseudo_masks'))
    assert not os.path.exists(os.path.join(folder, 'summary.json'))
    assert not os.path.exists(os.path.join(folder, 'fully_supervised', 'test_metrics.json'))


def test_a_stage_waited_for_late_is_timed_to_its_own_end(tmp_path):
    """The baseline beside the chain is waited for when the chain needs it, often long after it
    ended: its wall time still ends with it, its CPU time is its own and not a sibling's, and a
    stage stopped while it runs ends at once."""
    busy = runner.Stage('busy', ['-c', 'import time\nt = time.process_time()\n'
                                       'while time.process_time() - t < 0.5: pass'], str(tmp_path), 1)
    short = runner.Stage('short', ['-c', 'import time; time.sleep(0.3)'], str(tmp_path), 1)
    endless = runner.Stage('endless', ['-c', 'import time; time.sleep(60)'], str(tmp_path), 1)
    assert busy.wait()['cpu_s'] >= 0.5
    time.sleep(1.5)
    assert not short.running() and endless.running()
    timing = short.wait()
    assert 0.3 <= timing['wall_s'] < 1.5 and timing['cpu_s'] < 0.4, timing
    endless.stop()
    assert not endless.running() and endless.process.returncode == -signal.SIGTERM


@pytest.mark.slow
def test_synthetic_dataset_of_another_configuration_is_refused(run):
    folder, _ = run
    dataroot = os.path.join(folder, 'synthetic')
    runner.check_synthetic(dataroot, QUICK)  # the one made for this configuration passes
    with pytest.raises(InputError, match=re.escape(f'{dataroot}: holds {QUICK["train"]} train patches of '
                                                   f'{QUICK["size"]} px, this configuration expects 2000 of 64 px')):
        runner.check_synthetic(dataroot, {'size': 64, 'train': 2000, 'val': 60, 'test': 60})


def test_summary_table_of_a_released_dataset_says_what_is_missing():
    """No train_gt (the released datasets) and no ablation (the reference configuration): no
    pseudo-mask or train-patch scores, no fully-supervised baseline, no ablation."""
    s = {'miou': 0.5, 'fwiou': 0.25}
    iou = {'TE': 0.5, 'NEC': 0.25, 'LYM': 0.75, 'TAS': 0.5}
    v = {'miou': 0.75, 'fwiou': 0.5}
    summary = {'dataroot': 'datasets/LUAD-HistoSeg', 'stage1_cam_val': v, 'stage1_cam_test': s,
               'pseudo_masks_val': {f'PM_{layer}': v for layer in PAPER_LAYERS}, 'pseudo_masks_train': None,
               'stage2_val': v, 'stage2_train': None, 'stage2_test': {'no_gate': s, 'gate_multiply': s, 'gate_mask': s},
               'ablation_bn7_test': None, 'fully_supervised_test': None, 'class_iou_test': {'stage2': iou},
               'gap_points': None, 'stage1_restarts': None, 'alongside': False,
               'times': {'stage1': {'wall_s': 100.0, 'cpu_s': 98.0}, 'pseudo_masks': {'wall_s': 20.04, 'cpu_s': 19.96},
                         'pseudo_masks_val': {'wall_s': 2.0, 'cpu_s': 1.5},
                         'stage2': {'wall_s': 300.0, 'cpu_s': 290.0}, 'predictions': {'wall_s': 5.0, 'cpu_s': 4.0},
                         'total': {'wall_s': 425.0, 'cpu_s': 412.0}}}
    markdown = runner.summary_table(summary)
    table, class_iou = markdown_tables(markdown)
    cells = {row[1]: row[2:] for row in table[1:]}
    numbers = {result: [number(c) for c in row] for result, row in cells.items()}
    assert table[1] == ['data', 'dataset datasets/LUAD-HistoSeg (present)', '', '', '', '']  # found, not generated
    assert numbers['CAM, val patches'] == [0.75, 0.5, 100.0, 98.0] and numbers['CAM, test patches'][:2] == [0.5, 0.25]
    # what a real dataset gives on val: the pseudo-masks of the val patches, stage 2's best epoch
    assert [numbers[f'PM_{layer}, val patches vs val/mask'][:2] for layer in PAPER_LAYERS] == [[0.75, 0.5]] * 3
    assert numbers[VAL_STAGE2] == [0.75, 0.5, 300.0, 290.0]
    assert [numbers[f'test, {gate}'][:2] for gate in ('no gate', 'gate (multiply, reference)', 'gate (mask)')] == \
        [[0.5, 0.25]] * 3
    # what could not be measured reads n/a (not 0, not blank)
    for result in (*[f'PM_{layer}, train patches vs train_gt (diagnostic)' for layer in PAPER_LAYERS],
                   'train patches vs train_gt (diagnostic: what it learnt from)',
                   'stage 2 on PM_bn7 alone (--supervision bn7); test, no gate',
                   'same model, data and budget, train_gt (diagnostic); test, no gate'):
        assert cells[result][:2] == ['n/a', 'n/a'], result
    # each stage's times on its first row, at 0.1 s; none for the stages that did not run
    assert {result: values[2:] for result, values in numbers.items() if values[2] is not None} == {
        'CAM, val patches': [100.0, 98.0], 'PM_b4_5, val patches vs val/mask': [2.0, 1.5],
        'PM_b4_5, train patches vs train_gt (diagnostic)': [20.0, 20.0], VAL_STAGE2: [300.0, 290.0],
        'predictions of the test and train patches, contact sheet': [5.0, 4.0], 'all of the above': [425.0, 412.0]}
    assert runner.findings(summary) == [] and 'points' not in markdown
    assert runner.DIAGNOSTIC not in markdown  # no diagnostic was measured
    assert class_iou[0] == ['test, no gate: IoU', *iou]
    assert class_iou[1][0] == 'stage 2 (multi-layer)' and [number(c) for c in class_iou[1][1:]] == list(iou.values())
    # With train_gt and the ablation: what the rows say against each other, either way round, in
    # MIoU points of stage 2 against: full supervision, its best pseudo-masks, PM_bn7 alone.
    summary.update(fully_supervised_test=s, gap_points=-1.5, ablation_bn7_test={'miou': 0.52, 'fwiou': 0.3},
                   pseudo_masks_train={'PM_b4_5': s, 'PM_b5_2': {'miou': 0.6, 'fwiou': 0.6}, 'PM_bn7': s},
                   stage2_train={'miou': 0.65, 'fwiou': 0.6})
    said = runner.findings(summary)
    assert [stage2_minus_other(line) for line in said] == [1.5, 5.0, -2.0]
    assert said[0].endswith('the fully-supervised model') and said[1].endswith('its best pseudo-masks (PM_b5_2)')
    assert said[2].endswith('PM_bn7 alone on the test patches')
    assert [line for line in runner.summary_table(summary).splitlines() if 'points' in line] == said
    assert runner.DIAGNOSTIC in runner.summary_table(summary).splitlines()


def test_seeds_table_gives_mean_spread_and_every_seed():
    s = lambda v: {'miou': v, 'fwiou': v}
    runs = []
    for seed, v in zip((0, 1, 2), (0.5, 0.6, 0.7)):
        runs.append({'seed': seed, 'dataroot': 'd', 'stage1_cam_val': s(v + 0.05), 'stage1_cam_test': s(v),
                     'pseudo_masks_val': {f'PM_{layer}': s(v + 0.2) for layer in PAPER_LAYERS},
                     'pseudo_masks_train': None, 'stage2_val': s(v + 0.15),
                     'stage2_train': None, 'stage2_test': {'no_gate': s(v + 0.1)}, 'ablation_bn7_test': None,
                     'fully_supervised_test': None, 'gap_points': None, 'alongside': True,
                     'class_iou_test': {'stage2': {'TE': v, 'NEC': 1 - v}},
                     'times': {'stage1': {'wall_s': 1.0, 'cpu_s': 1.0}, 'total': {'wall_s': 300 + seed, 'cpu_s': 500.0}}})
    (header, *rows), = markdown_tables(runner.seeds_table(runs))
    assert header == ['stage', 'result', 'MIoU mean', 'sd', 'min', 'max', 'seed 0', 'seed 1', 'seed 2']
    assert [row[0] for row in rows] == ['stage 1', '', 'pseudo-masks', '', '', 'stage 2', '', 'stage 2 (multi-layer)',
                                        'stage 2 (multi-layer)', 'total', 'total']
    per_seed = {'CAM, val patches': [0.55, 0.65, 0.75], 'CAM, test patches': [0.5, 0.6, 0.7],  # only what was scored
                **{f'PM_{layer}, val patches vs val/mask': [0.7, 0.8, 0.9] for layer in PAPER_LAYERS},
                VAL_STAGE2: [0.65, 0.75, 0.85], 'test, no gate': [0.6, 0.7, 0.8],
                'IoU TE, test, no gate': [0.5, 0.6, 0.7], 'IoU NEC, test, no gate': [0.5, 0.4, 0.3],
                'wall time of a run (s)': [300, 301, 302], 'CPU time of a run (s)': [500, 500, 500]}
    assert [row[1] for row in rows] == list(per_seed)
    for _, result, *cells in rows:
        values = per_seed[result]
        expected = [np.mean(values), np.std(values, ddof=1), min(values), max(values), *values]
        places = 0.5 if 'time' in result else HALF  # times to the second, scores to 4 decimals
        assert [number(c) for c in cells] == pytest.approx(expected, abs=places), result


def test_reduced_recipe_trains_for_the_same_patches_seen_on_any_dataset(tmp_path):
    """20 epochs of the embedded 800 patches in stage 1, PDA from the 13th, 10 in stage 2; more
    epochs on fewer patches, fewer on more, at least one; configurations without a budget give no
    flags."""
    reduced = runner.CONFIGS['reduced']

    def length(patches):
        folder = tmp_path / str(patches)
        folder.mkdir()
        for i in range(patches):
            (folder / f'p{i}.png').touch()
        return runner.training_length(reduced, str(folder))
    assert length(reduced['synthetic']['train']) == {'stage1': ['--max_epoches', '20', '--pda_from_epoch', '12'],
                                                     'stage2': ['--epochs', '10']}
    assert length(600) == {'stage1': ['--max_epoches', '27', '--pda_from_epoch', '16'], 'stage2': ['--epochs', '13']}
    assert length(9000) == {'stage1': ['--max_epoches', '2', '--pda_from_epoch', '1'], 'stage2': ['--epochs', '1']}
    assert not {'--max_epoches', '--pda_from_epoch'} & set(reduced['stage1']) and '--epochs' not in reduced['stage2']
    assert runner.training_length(runner.CONFIGS['reference'], str(tmp_path / 'absent')) == {}


def test_default_configuration_follows_the_released_dataset(tmp_path, monkeypatch):
    parse = lambda *a: runner.get_args_parser().parse_args(list(a))
    monkeypatch.setattr(runner, 'ROOT', str(tmp_path))
    assert runner.choose_config(parse('--dataset', 'bcss')) == 'reduced'
    os.makedirs(tmp_path / 'datasets' / 'BCSS-WSSS')
    assert runner.choose_config(parse('--dataset', 'bcss')) == 'reference'
    assert runner.choose_config(parse('--dataset', 'luad')) == 'reduced'
    assert runner.choose_config(parse('--dataset', 'bcss', '--quick')) == 'quick'
    assert runner.default_dataroot('reduced', 'bcss', 'r') == os.path.join(str(tmp_path), 'datasets', 'SYNTH-BCSS')


def test_contact_sheet_prefers_patches_of_several_classes_in_name_order():
    labels = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [1, 1, 1, 1], [0, 1, 1, 0]], np.float32)
    assert choose_patches(labels, 3) == [1, 3, 4]
    assert choose_patches(labels, 5) == [1, 3, 4, 0, 2]


def test_stage1_restarts_must_be_at_least_one(tmp_path):
    result = run_pipeline('--quick', '--out', str(tmp_path / 'run'), '--stage1_restarts', '0')
    assert result.returncode == 2 and result.stderr.strip() == 'error: --stage1_restarts 0: must be 1 or more'
    assert not os.path.exists(tmp_path / 'run')


def test_the_demo_trains_a_second_stage1_restart_on_a_free_core_only():
    """Data without train_gt/ (a user's) leave the second core free during stage 1: two restarts;
    the demo's synthetic data train the fully-supervised baseline there: one. --stage1_restarts
    fixes the number."""
    reduced = runner.CONFIGS['reduced']
    assert runner.stage1_restarts(reduced, baseline_beside=False) == 2
    assert runner.stage1_restarts(reduced, baseline_beside=True) == 1
    assert runner.stage1_restarts({**reduced, 'stage1_restarts': 3}, baseline_beside=True) == 3
    assert runner.stage1_restarts(runner.CONFIGS['quick'], baseline_beside=True) == 2
    assert runner.stage1_restarts(runner.CONFIGS['reference'], baseline_beside=False) == 1
