"""Notebook 07's batch-size-2 runs (one epoch at a constant lr of 0.4) with other seeds: how noisy one run is.

    EXP_DATA_DIR=../shared/data python benchmarks/bs2_seeds.py --seeds 0 1 2
    EXP_DATA_DIR=../shared/data python benchmarks/bs2_seeds.py --norms BatchNorm2d RunningBatchNorm --seeds 3 4
    python benchmarks/bs2_seeds.py --table      # rewrite results/bs2_seeds.md from results/bs2_seeds.json

The same model (the lesson's: filters 8-16-32-64-64, the last convolution sees 1x1 pixels), data, callbacks and
learning rate as notebook 07's cells, one torch thread. Every finished run is written at once to
results/bs2_seeds.json (so an interrupted run resumes where it stopped; a run already there is skipped unless the
norm layer's code has changed since);
results/bs2_seeds.md is the table: per norm, the accuracy of each seed, their mean and range. Each run is one to a
few minutes on a 2-core CPU.
"""
import argparse, contextlib, hashlib, inspect, io, math, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_results import StudyResults  # noqa: E402  (the JSON and the table, written atomically after every run)

NFS = [8, 16, 32, 64, 64]   # notebook 07's network, the lesson's
NORMS = {'BatchNorm2d': lambda nb: nb.nn.BatchNorm2d, 'BatchNorm': lambda nb: nb.BatchNorm,
         'GroupNorm': lambda nb: nb.partial(nb.GroupNorm, 4), 'RunningBatchNorm': lambda nb: nb.RunningBatchNorm}
NOTEBOOK = {'BatchNorm2d': 'nn.BatchNorm2d', 'BatchNorm': 'BatchNorm', 'GroupNorm': 'GroupNorm (4 groups)',
            'RunningBatchNorm': 'RunningBatchNorm'}
RECIPE = ("notebook 07's batch-size-2 cells: the lesson's CNN (conv 8-16-32-64-64, the last sees 1x1 pixels; Kaiming init, "
          "ReLU, then the norm), SGD at a constant lr of 0.4, batch size 2, one epoch of the 50,000 training images, "
          "the norm layers of exp.nb_07; the data normalised with torch's default threads (as in the notebook), the fits "
          "on one thread; accuracy on the 10,000 validation images in evaluation mode")


def code_of(nb, norm):
    "A short hash of the norm layer's code (torch's version for nn.BatchNorm2d): a run made with other code is re-run."
    layer = NORMS[norm](nb)
    layer = getattr(layer, 'func', layer)
    src = nb.torch.__version__ if layer.__module__.startswith('torch') else inspect.getsource(layer)
    return hashlib.sha256(src.encode()).hexdigest()[:12]


def run_one(nb, data2, norm, seed):
    "Train one model as notebook 07 does at batch size 2 with `seed`; its record."
    cbfs = [nb.Recorder, nb.partial(nb.AvgStatsCallback, nb.accuracy), nb.DeviceCallback,
            nb.partial(nb.BatchTransformXCallback, nb.mnist_view)]
    nb.torch.manual_seed(seed)
    learn, run = nb.get_learn_run(NFS, data2, 0.4, nb.conv_layer, cbs=cbfs, norm=NORMS[norm](nb))
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()): run.fit(1, learn)
    seconds = time.perf_counter() - start
    (tl, ta), (vl, va) = run.avg_stats.train_stats.avg_stats, run.avg_stats.valid_stats.avg_stats
    def num(v): v = float(v); return v if math.isfinite(v) else None
    return {'norm': norm, 'seed': seed, 'valid_acc': num(va), 'valid_loss': num(vl), 'train_acc': num(ta),
            'train_loss': num(tl), 'code': code_of(nb, norm), 'steps': len(data2.train_dl), 'seconds': round(seconds, 1)}


def table(results):
    "The markdown table: per norm, each seed's validation accuracy, the mean and the range."
    runs, meta = results['runs'], results['meta']
    seeds = sorted({r['seed'] for r in runs.values()})
    lines = [f"Validation accuracy (%) after one epoch at batch size 2 (lr 0.4) for seeds {', '.join(map(str, seeds))}. "
             f"{meta['recipe']}.", '',
             f"Made by `{meta['command']}` on {meta['machine']}, torch {meta['torch']}, {meta['date']}; {len(runs)} runs, "
             f"{sum(r['seconds'] for r in runs.values()) / 60:.0f} minutes of training.", '',
             '| norm | ' + ' | '.join(f'seed {s}' for s in seeds) + ' | mean | min-max |', '|---|' + '---:|' * (len(seeds) + 2)]
    for norm in NORMS:
        rs = {r['seed']: r for r in runs.values() if r['norm'] == norm}
        if not rs: continue
        accs = [r['valid_acc'] * 100 for r in rs.values() if r['valid_acc'] is not None]
        cells = [f"{rs[s]['valid_acc'] * 100:.1f}" if s in rs and rs[s]['valid_acc'] is not None else ('NaN' if s in rs else '…')
                 for s in seeds]
        rng = f'{min(accs):.1f}-{max(accs):.1f}' if len(accs) > 1 else ''
        mean = f'{sum(accs) / len(accs):.1f}' if accs else ''
        lines.append(f'| {NOTEBOOK[norm]} | ' + ' | '.join(cells) + f' | {mean} | {rng} |')
    blew = [f"{NOTEBOOK[r['norm']]} seed {r['seed']} ({r['train_loss']:.1e})" if r['train_loss'] is not None
            else f"{NOTEBOOK[r['norm']]} seed {r['seed']} (NaN)" for r in sorted(runs.values(), key=lambda r: (r['norm'], r['seed']))
            if r['train_loss'] is None or r['train_loss'] > 10]
    lines += ['', 'Training blew up (the training loss, averaged over the epoch, above 10 or not a number) in: '
              + (', '.join(blew) or 'none') + '.', '', '… : not run. Notebook 07 runs seed 1.']
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--norms', nargs='+', choices=list(NORMS), default=['BatchNorm2d', 'RunningBatchNorm', 'GroupNorm'],
                   help='norm layers, in this order for each seed (default: BatchNorm2d RunningBatchNorm GroupNorm)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='seeds (default 0 1 2)')
    p.add_argument('--out', default=str(ROOT / 'results'), help='folder for bs2_seeds.json and .md')
    p.add_argument('--table', action='store_true', help='only rewrite the markdown table from the json')
    args = p.parse_args(argv)
    study = StudyResults(args.out, 'bs2_seeds', table)
    if args.table: return study.rewrite_table(p)
    import exp.nb_07 as nb
    results = study.load(p, RECIPE, 'bs2_seeds.py', argv, nb.torch.__version__)   # before the data: a wrong file fails at once
    x_train, y_train, x_valid, y_valid = nb.get_data()
    x_train, x_valid = nb.normalize_to(x_train, x_valid)   # with torch's default threads: the mean's last bit depends
    nb.torch.set_num_threads(1)                            # on the threads, and changes the runs
    data2 = nb.DataBunch(*nb.get_dls(nb.Dataset(x_train, y_train), nb.Dataset(x_valid, y_valid), 2), 10)
    for seed in args.seeds:
        for norm in args.norms:
            done = results['runs'].get(f'{norm}/seed{seed}')
            if done and done.get('code') == code_of(nb, norm): continue   # made with the layer's current code
            r = run_one(nb, data2, norm, seed)
            results['runs'][f'{norm}/seed{seed}'] = r
            study.save(results)
            print(norm, seed, f"{r['valid_acc']}", f"in {r['seconds']:.0f} s", flush=True)
    print(study.md_path.read_text())


if __name__ == '__main__':
    main()
