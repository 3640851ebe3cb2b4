"""Why does notebook 07's layer norm train (98% at lr 0.8) where the lesson's run gave NaN losses? A small ablation.

    EXP_DATA_DIR=../shared/data python benchmarks/layernorm_ablation.py                 # the default grid
    EXP_DATA_DIR=../shared/data python benchmarks/layernorm_ablation.py --seeds 0 1 2 3 --lrs 0.8 1.2 1.6
    python benchmarks/layernorm_ablation.py --table     # rewrite results/layernorm_ablation.md from the json

Notebook 07's layer-norm cell (the lesson's CNN, conv 8-16-32-64-64 with a LayerNorm after each conv and ReLU, batch
size 512, SGD at a constant lr) with what differs from the lesson's `conv_ln` varied one at a time: the variance's
estimator (ours divides by n, as F.layer_norm does; the lesson's `x.var` by n-1), the convolutions' bias (the
lesson's conv_ln keeps it; without it), and the learning rate; over a few seeds. Short runs: one epoch over the first
`--n-train` training images (default all 50,000: 98 steps; the divergences seen came at steps 34 to 95), one torch thread; a run stops at its first NaN or infinite
training loss (StopOnNanCallback), which is recorded as the step it diverged at. Every finished run is written at once
to results/layernorm_ablation.json (runs already there are skipped), and the table to results/layernorm_ablation.md.
"""
import argparse, contextlib, io, math, sys, time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_results import StudyResults  # noqa: E402  (the JSON and the table, written atomically after every run)

import torch
from torch import nn

NFS = [8, 16, 32, 64, 64]   # notebook 07's network, the lesson's
VARIANTS = [('biased', True), ('unbiased', True), ('biased', False), ('unbiased', False)]  # (estimator, conv bias)
NAMES = {('biased', True): "notebook 07's (variance / n, conv bias)",
         ('unbiased', True): "the lesson's (variance / (n-1), conv bias)",
         ('biased', False): 'variance / n, no conv bias', ('unbiased', False): 'variance / (n-1), no conv bias'}


class AblationLayerNorm(nn.Module):
    "Notebook 07's LayerNorm, with the variance divided by n (`unbiased=False`, as ours) or by n-1 (as the lesson's)."
    def __init__(self, unbiased=False, eps=1e-5):
        super().__init__()
        self.unbiased, self.eps = unbiased, eps
        self.mult = nn.Parameter(torch.tensor(1.))
        self.add  = nn.Parameter(torch.tensor(0.))

    def forward(self, x):
        dims = tuple(range(1, x.dim()))
        m = x.mean(dims, keepdim=True)
        v = x.var(dims, keepdim=True, correction=1 if self.unbiased else 0)
        return (x - m) / (v + self.eps).sqrt() * self.mult + self.add


def key(r): return f"{r['estimator']}/bias={r['bias']}/lr{r['lr']}/seed{r['seed']}"


def run_one(nb, data, estimator, bias, lr, seed, n_valid):
    "One run of notebook 07's layer-norm cell with these settings; its record."
    conv_ln = partial(nb.conv_layer, norm=lambda nf: AblationLayerNorm(estimator == 'unbiased'), bias=bias)
    cbs = [partial(nb.AvgStatsCallback, nb.accuracy), partial(nb.BatchTransformXCallback, nb.mnist_view)]
    torch.manual_seed(seed)
    learn, run = nb.get_learn_run(NFS, data, lr, conv_ln, cbs=cbs)
    peak = [0.]   # the largest finite |input| of any layer norm in training: how large the activations grew
    def record(mod, inp, outp):
        if mod.training and torch.isfinite(a := inp[0].detach().abs().max()): peak[0] = max(peak[0], a.item())
    hooks = [m.register_forward_hook(record) for m in learn.model.modules() if isinstance(m, AblationLayerNorm)]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()): run.fit(1, learn)
    seconds = time.perf_counter() - start
    for h in hooks: h.remove()
    found = run.stop_on_nan.found_at
    model = learn.model.eval()
    with torch.no_grad():
        x, y = data.valid_ds.x[:n_valid].view(-1, 1, 28, 28), data.valid_ds.y[:n_valid]
        acc = (model(x).argmax(1) == y).float().mean().item()
    loss = float(run.avg_stats.train_stats.avg_stats[0])
    return {'estimator': estimator, 'bias': bias, 'lr': lr, 'seed': seed, 'steps': len(data.train_dl),
            'diverged_at': int(found[1]) if found else None, 'train_loss': loss if math.isfinite(loss) else None,
            'valid_acc': acc, 'peak_activation': peak[0], 'seconds': round(seconds, 1)}


def table(results):
    "The markdown table: per variant and learning rate, how many seeds diverged (and at which step), and the accuracy."
    runs, meta = results['runs'], results['meta']
    lrs = sorted({r['lr'] for r in runs.values()})
    seeds = sorted({r['seed'] for r in runs.values()})
    lines = [f"Notebook 07's layer-norm cell, varied: {meta['recipe']}. Seeds {', '.join(map(str, seeds))}.", '',
             f"Made by `{meta['command']}` on {meta['machine']}, torch {meta['torch']}, {meta['date']}; {len(runs)} runs, "
             f"{sum(r['seconds'] for r in runs.values()) / 60:.1f} minutes of training.", '',
             'Each cell: the seeds whose training loss became NaN or infinite, of those run (the steps they diverged at, '
             'counted from 0), then the mean validation accuracy (%) of the seeds that did not diverge.', '',
             '| layer norm | ' + ' | '.join(f'lr {lr:g}' for lr in lrs) + ' |', '|---|' + '---:|' * len(lrs)]
    for variant in VARIANTS:
        cells = []
        for lr in lrs:
            rs = [r for r in runs.values() if (r['estimator'], r['bias'], r['lr']) == (*variant, lr)]
            if not rs: cells.append('…'); continue
            div = sorted(r['diverged_at'] for r in rs if r['diverged_at'] is not None)
            ok = [r['valid_acc'] * 100 for r in rs if r['diverged_at'] is None]
            cell = f"{len(div)}/{len(rs)} NaN" + (f" (step {', '.join(map(str, div))})" if div else '')
            cells.append(cell + (f'; {sum(ok) / len(ok):.1f}' if ok else ''))
        lines.append(f'| {NAMES[variant]} | ' + ' | '.join(cells) + ' |')
    grew = [r['peak_activation'] for r in runs.values() if r['diverged_at'] is not None]
    kept = [r['peak_activation'] for r in runs.values() if r['diverged_at'] is None]
    lines += ['', f"The largest input of a layer norm during training: {min(grew):.3g} to {max(grew):.3g} in the runs that "
              f"diverged, {min(kept):.3g} to {max(kept):.3g} in the others." if grew and kept else '', '… : not run.']
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4, 5], help='seeds (default 0 to 5)')
    p.add_argument('--lrs', type=float, nargs='+', default=[0.4, 0.8], help='learning rates (default 0.4 0.8)')
    p.add_argument('--n-train', type=int, default=50_000, help='training images, one epoch (default all 50000)')
    p.add_argument('--n-valid', type=int, default=2_000, help='validation images for the accuracy (default 2000)')
    p.add_argument('--out', default=str(ROOT / 'results'), help='folder for layernorm_ablation.json and .md')
    p.add_argument('--table', action='store_true', help='only rewrite the markdown table from the json')
    args = p.parse_args(argv)
    study = StudyResults(args.out, 'layernorm_ablation', table)
    if args.table: return study.rewrite_table(p)
    if args.n_train < 512: p.error(f'--n-train must be at least one batch (512), got {args.n_train}')
    import exp.nb_07 as nb
    torch.set_num_threads(1)
    recipe = (f"the lesson's CNN (conv 8-16-32-64-64, Kaiming init, ReLU, then LayerNorm), batch size 512, SGD at a "
              f"constant lr, one epoch over the first {args.n_train:,} training images, accuracy on the first "
              f"{args.n_valid:,} validation images")
    results = study.load(p, recipe, 'layernorm_ablation.py', argv, torch.__version__)
    x_train, y_train, x_valid, y_valid = nb.get_data()
    x_train, x_valid = nb.normalize_to(x_train, x_valid)   # normalised with the whole training set, as in 07
    data = nb.DataBunch(*nb.get_dls(nb.Dataset(x_train[:args.n_train], y_train[:args.n_train]),
                                    nb.Dataset(x_valid[:args.n_valid], y_valid[:args.n_valid]), 512), 10)
    for lr in args.lrs:
        for seed in args.seeds:
            for estimator, bias in VARIANTS:
                r = {'estimator': estimator, 'bias': bias, 'lr': lr, 'seed': seed}
                if key(r) in results['runs']: continue
                r = run_one(nb, data, estimator, bias, lr, seed, args.n_valid)
                results['runs'][key(r)] = r
                study.save(results)
                print(key(r), f"diverged at step {r['diverged_at']}" if r['diverged_at'] is not None
                      else f"accuracy {r['valid_acc']:.4f}", f"in {r['seconds']:.0f} s", flush=True)
    print(study.md_path.read_text())


if __name__ == '__main__':
    main()
