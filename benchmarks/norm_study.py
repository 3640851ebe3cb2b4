"""The study lesson 10 had not done: validation accuracy after one epoch of the lesson's CNN for every norm layer
at every batch size, on MNIST and Fashion-MNIST, each cell the mean over seeds.

    EXP_DATA_DIR=../shared/data python benchmarks/norm_study.py             # the whole study, 2 worker processes
    python benchmarks/norm_study.py --estimate      # time a few steps of each configuration, print the expected total
    python benchmarks/norm_study.py --smoke         # a tiny run (subsets of the data) into a fresh temporary folder
    python benchmarks/norm_study.py --table         # rewrite results/norm_study.md from results/norm_study.json

Every finished run is written at once to results/norm_study.json, so an interrupted study resumes where it stopped;
results/norm_study.md is the table. Studies sharing a folder (say `--seeds 0` and `--seeds 1` at once) each merge their
runs into the file under a lock on the folder, so no finished run is lost. Each worker process uses one torch thread.

The recipe, the same for every cell: notebook 07's CNN, the lesson's (`get_learn_run`: convolutions of 8, 16, 32, 64, 64
channels, each of stride 2, so that the last sees 1x1 pixels; Kaiming init, ReLU, then the norm layer), SGD, one epoch over the 50,000 training images. The learning rate rule:
peak `lr = 0.4 * (bs/2)**0.25` (0.4, 0.57, 0.8 and 1.6 for batches of 2, 8, 32 and 512: the lesson's 0.4 at batch
size 2 and about its 1.0 at 32), warming up along a cosine from lr/10 over the first 25% of the steps, then annealing
along a cosine to lr/20. Accuracy on the 10,000 validation images, the model in evaluation mode.
"""
import argparse, datetime, json, math, os, platform, sys, tempfile, time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from notebook2script import write_atomic  # temporary file + os.replace: an interrupted study never leaves half a file

DATASETS = ('mnist', 'fashion-mnist')
NORMS = ('none', 'BatchNorm', 'LayerNorm', 'InstanceNorm', 'GroupNorm', 'RunningBatchNorm')
BATCH_SIZES = (2, 8, 32, 512)
NFS = [8, 16, 32, 64, 64]  # notebook 07's network, the lesson's: the last convolution sees 1x1 pixels
GROUPS = 4  # GroupNorm: 4 groups of 2, 4, 8, 16 and 16 channels

RECIPE = (f"Every cell: the CNN of notebook 07, the lesson's (conv {'-'.join(map(str, NFS))}, each of stride 2, so the last "
          f"sees 1x1 pixels; Kaiming init, ReLU, then the norm layer; GroupNorm with {GROUPS} groups, LayerNorm with the conv "
          "bias as in the lesson, each layer's default eps; RunningBatchNorm as exported by notebook 07), SGD for one epoch "
          "of 50,000 images; peak lr = 0.4*(bs/2)**0.25 (0.4, 0.57, 0.8, 1.6), cosine warm-up from lr/10 over 25% of the "
          "steps, cosine annealing to lr/20; accuracy on the 10,000 validation images in evaluation mode.")

def peak_lr(bs): return 0.4 * (bs / 2) ** 0.25

def lr_schedule(bs):
    "The learning rate over the epoch (a function of the position 0..1)."
    from exp.nb_07 import combine_scheds, sched_cos
    lr = peak_lr(bs)
    return combine_scheds([0.25, 0.75], [sched_cos(lr / 10, lr), sched_cos(lr, lr / 20)])

def conv_for(norm):
    "The conv layer function for `norm` (None: no norm layer)."
    from exp.nb_07 import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RunningBatchNorm, conv_layer
    if norm == 'none': return partial(conv_layer, bn=False)
    if norm == 'LayerNorm': return partial(conv_layer, norm=lambda nf: LayerNorm(), bias=True)  # as the lesson's conv_ln
    if norm == 'GroupNorm': return partial(conv_layer, norm=partial(GroupNorm, GROUPS))
    return partial(conv_layer, norm={'BatchNorm': BatchNorm, 'InstanceNorm': InstanceNorm,
                                     'RunningBatchNorm': RunningBatchNorm}[norm])

_DATA = {}
def load(dataset, n_train=None, n_valid=None):
    "Normalised training and validation sets of `dataset` (cached per process)."
    key = (dataset, n_train, n_valid)
    if key not in _DATA:
        from exp.nb_07 import Dataset, get_data, normalize_to
        x_train, y_train, x_valid, y_valid = get_data(dataset)
        x_train, y_train, x_valid, y_valid = x_train[:n_train], y_train[:n_train], x_valid[:n_valid], y_valid[:n_valid]
        x_train, x_valid = normalize_to(x_train, x_valid)
        _DATA[key] = Dataset(x_train, y_train), Dataset(x_valid, y_valid)
    return _DATA[key]

def accuracy_of(model, valid_ds, bs=1000):
    "Validation accuracy of `model` in evaluation mode."
    import torch
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(valid_ds), bs):
            xb, yb = valid_ds.x[i:i + bs].view(-1, 1, 28, 28), valid_ds.y[i:i + bs]
            correct += int((model(xb).argmax(1) == yb).sum())
    return correct / len(valid_ds)

def run_one(job):
    "Train one cell of the study for one epoch; its record."
    import io
    from contextlib import redirect_stdout
    import torch
    torch.set_num_threads(1)
    from exp.nb_07 import (AvgStatsCallback, BatchTransformXCallback, DataBunch, ParamScheduler, accuracy,
                           get_dls, get_learn_run, mnist_view)
    dataset, norm, bs, seed, n_train, n_valid, max_steps = job
    train_ds, valid_ds = load(dataset, n_train, n_valid)
    data = DataBunch(*get_dls(train_ds, valid_ds, bs), c=10)
    torch.manual_seed(seed)
    cbs = [partial(AvgStatsCallback, accuracy, print_stats=False), partial(BatchTransformXCallback, mnist_view),
           partial(ParamScheduler, 'lr', lr_schedule(bs))]
    if max_steps: cbs.append(partial(StopAfter, max_steps))
    learn, run = get_learn_run(NFS, data, peak_lr(bs), conv_for(norm), cbs=cbs)
    start = time.perf_counter()
    log = io.StringIO()
    with redirect_stdout(log): run.fit(1, learn)
    seconds = time.perf_counter() - start
    stopped = getattr(run.stop_on_nan, 'found_at', None)
    train_loss = run.avg_stats.train_stats.avg_stats[0]
    return {'dataset': dataset, 'norm': norm, 'bs': bs, 'seed': seed, 'lr': peak_lr(bs),
            'valid_acc': accuracy_of(learn.model, valid_ds), 'train_loss': train_loss if math.isfinite(train_loss) else None,
            'diverged_at': list(stopped) if stopped else None, 'steps': len(data.train_dl), 'seconds': round(seconds, 1)}

def StopAfter(n):
    "A callback stopping training after `n` steps (for --estimate and --smoke)."
    from exp.nb_07 import Callback, CancelTrainException
    class _StopAfter(Callback):
        def after_batch(self):
            if self.in_train and self.n_iter >= n: raise CancelTrainException()
    return _StopAfter()

def key(r): return f"{r['dataset']}/{r['norm']}/bs{r['bs']}/seed{r['seed']}"

FIELDS = {'dataset': str, 'norm': str, 'bs': int, 'seed': int, 'valid_acc': (int, float), 'seconds': (int, float)}

class BadResults(ValueError):
    "A results file that is not a norm study's: one line naming the file and what is wrong."

def problem(results):
    "What is wrong with the parsed `results` of a study (None when nothing is)."
    if not isinstance(results, dict): return f'holds a JSON {type(results).__name__}, not an object'
    if not isinstance(results.get('runs'), dict): return "has no 'runs' object"
    if not isinstance(results.get('meta', {}), dict): return "its 'meta' is not an object"
    for name, r in results['runs'].items():
        if not isinstance(r, dict): return f'run {name!r} is not an object'
        wrong = [f for f, kind in FIELDS.items() if not isinstance(r.get(f), kind) or isinstance(r.get(f), bool)]
        if not isinstance(r.get('diverged_at', 0), (list, type(None))): wrong.append('diverged_at')
        if wrong: return f"run {name!r} lacks a valid {', '.join(wrong)}"
        if name != key(r): return f'run {name!r} is filed under the wrong name (its fields say {key(r)!r})'

def read_results(json_path):
    "The results in `json_path` ({'runs': {}} when there is no file); BadResults when it is not a study's."
    if not json_path.exists(): return {'runs': {}}
    try: results = json.loads(json_path.read_text(encoding='utf-8'))
    except UnicodeDecodeError: why = 'is not text (binary data)'
    except json.JSONDecodeError as e: why = 'is empty' if not e.doc.strip() else f'is not complete JSON ({e.msg} at line {e.lineno})'
    except OSError as e: why = f'cannot be read ({e.strerror or e})'
    else: why = problem(results)
    if why: raise BadResults(f'{json_path} {why}: not a norm-study results file; move it away, or pass --out to another folder')
    return results

@contextmanager
def locked(folder):
    "Hold a lock on `folder` for the block: one study at a time reads, merges and writes its results."
    folder.mkdir(parents=True, exist_ok=True)
    if os.name == 'nt':  # a lock file beside the results, locked with msvcrt
        import msvcrt
        with open(folder / 'norm_study.lock', 'a+b') as f:
            while True:
                try: msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1); break  # LK_LOCK itself retries for 10 s
                except OSError: pass
            try: yield
            finally: f.seek(0); msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
    else:  # the folder itself, so that no lock file is left behind; the system releases it if the process dies
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally: os.close(fd)

def table(results):
    "The markdown table: one block per dataset, norms by batch sizes, mean accuracy over the seeds (and their range)."
    runs, meta = results['runs'], results['meta']
    done = sorted({r['seed'] for r in runs.values()})  # the seeds the table's numbers come from
    seeds = sorted(set(meta['seeds']) | set(done))
    over = (f"mean over seeds {', '.join(map(str, done))} (min-max in brackets)" if len(done) > 1 else
            f"one run per cell (seed {done[0]})" if done else "no runs yet")
    lines = [f"Validation accuracy (%) after one epoch of the lesson's CNN, {over}. {meta['recipe']}",
             '', f"Made by `{meta['command']}` on {meta['machine']}, torch {meta['torch']}, {meta['date']}; "
             f"{len(runs)} runs, {sum(r['seconds'] for r in runs.values()) / 3600:.1f} hours of training.", '']
    for dataset in DATASETS:
        lines += [f'**{dataset}**', '', '| norm | ' + ' | '.join(f'bs={bs}' for bs in BATCH_SIZES) + ' |',
                  '|---|' + '---:|' * len(BATCH_SIZES)]
        for norm in NORMS:
            cells = []
            for bs in BATCH_SIZES:
                accs = [r['valid_acc'] * 100 for r in runs.values() if (r['dataset'], r['norm'], r['bs']) == (dataset, norm, bs)]
                div = sum(1 for r in runs.values() if (r['dataset'], r['norm'], r['bs']) == (dataset, norm, bs) and r['diverged_at'])
                if not accs: cells.append('…'); continue
                cell = f'{sum(accs) / len(accs):.1f}' + (f' ({min(accs):.1f}-{max(accs):.1f})' if len(accs) > 1 else '')
                if div: cell += f' †{div}'
                if len(accs) < len(seeds): cell += f' [{len(accs)}/{len(seeds)}]'
                cells.append(cell)
            lines.append(f'| {norm} | ' + ' | '.join(cells) + ' |')
        lines.append('')
    lines.append('† n: in n of the seeds the training loss became NaN or infinite and training stopped (StopOnNanCallback); '
                 'the accuracy is that of the model as it stopped. … : not run yet.'
                 + (f' [k/{len(seeds)}]: only k of the seeds {", ".join(map(str, seeds))} run yet.' if len(seeds) > 1 else ''))
    return '\n'.join(lines) + '\n'

def write(results, json_path, md_path):
    "Merge `results` with the file's runs (another study may share it) under a lock, then write the file and the table."
    with locked(json_path.parent):
        on_disk = read_results(json_path)
        if on_disk['runs'] and on_disk.get('meta', {}).get('recipe') != results['meta']['recipe']:
            raise BadResults(f'{json_path} now holds runs made with another recipe; pass --out to another folder')
        results['runs'] = {**on_disk['runs'], **results['runs']}  # never lose a run another study finished
        results['meta']['seeds'] = sorted(set(results['meta']['seeds']) | set(on_disk.get('meta', {}).get('seeds', [])))
        write_atomic(json_path, json.dumps(results, indent=1, sort_keys=True))
        write_atomic(md_path, table(results))

def fail(message):
    "End with one line on stderr and exit status 2."
    print(f'norm_study.py: {message}', file=sys.stderr)
    sys.exit(2)

def save(results, json_path, md_path):
    "`write`, ending the study with one line if the file was spoilt meanwhile (the finished runs are in `results`)."
    try: write(results, json_path, md_path)
    except BadResults as e: fail(e)

def finished(jobs, workers):
    "The records of `jobs`, each as soon as one of `workers` processes has run it."
    import multiprocessing as mp
    with mp.get_context('spawn').Pool(workers) as pool:
        yield from pool.imap_unordered(run_one, jobs)

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workers', type=int, default=2, help='worker processes, one torch thread each (default 2)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1], help='seeds (default 0 1)')
    parser.add_argument('--out', default=str(ROOT / 'results'), help='folder for norm_study.json and .md')
    parser.add_argument('--estimate', action='store_true', help='time 100 steps of each configuration and print the expected total')
    parser.add_argument('--smoke', action='store_true', help='a tiny run into a fresh temporary folder')
    parser.add_argument('--table', action='store_true', help='only rewrite the markdown table from the json')
    args = parser.parse_args(argv)
    if args.workers < 1: parser.error(f'--workers must be at least 1, got {args.workers}')
    if not os.environ.get('EXP_DATA_DIR'): print('note: EXP_DATA_DIR is not set; get_data will use its cache or download')
    out = Path(tempfile.mkdtemp(prefix='norm_study_smoke_')) if args.smoke else Path(args.out)  # a smoke run: a fresh folder
    json_path, md_path = out / 'norm_study.json', out / 'norm_study.md'
    if args.table:
        if not json_path.is_file(): parser.error(f'--table: {json_path} does not exist; run the study first')
        try: results = read_results(json_path)
        except BadResults as e: fail(e)
        if 'meta' not in results: fail(f"{json_path} has no 'meta' object: not a norm-study results file")
        write_atomic(md_path, table(results))
        print(md_path.read_text()); return

    import multiprocessing as mp
    import torch
    n_train = n_valid = max_steps = None
    seeds = args.seeds
    if args.smoke: n_train, n_valid, max_steps, seeds = 2000, 500, 30, [0]
    if args.estimate:
        jobs = [('mnist', norm, bs, 0, None, 1000, 100) for norm in NORMS for bs in BATCH_SIZES]
        with mp.get_context('spawn').Pool(args.workers) as pool:
            recs = pool.map(run_one, jobs)
        total = 0.
        for r in recs:
            full_steps = math.ceil(50_000 / r['bs'])
            per_run = r['seconds'] / min(100, r['steps']) * full_steps
            total += per_run * len(DATASETS) * len(seeds)
            print(f"{r['norm']:16s} bs={r['bs']:3d}: {r['seconds'] / min(100, r['steps']) * 1e3:6.1f} ms/step, "
                  f"{per_run / 60:5.1f} min per epoch")
        print(f'expected: {total / 3600:.1f} hours of training for {len(DATASETS) * len(seeds)} runs per cell, '
              f'{total / 3600 / args.workers:.1f} hours on {args.workers} workers (validation not counted)')
        return

    # a study resumes from its json; a smoke run always starts afresh
    try: results = read_results(json_path)
    except BadResults as e: fail(e)
    made_with = results.get('meta', {}).get('recipe')
    if results['runs'] and made_with != RECIPE:
        parser.error(f'{json_path} holds runs made with another recipe (another network or rule), which this study '
                     f'would mix into its table: move it away, or pass --out to another folder. Its recipe: {made_with}')
    results['meta'] = {
        'command': 'python benchmarks/norm_study.py' + ''.join(f' {a}' for a in (argv if argv is not None else sys.argv[1:])),
        'machine': f'{platform.machine()} CPU, {os.cpu_count()} cores, {args.workers} worker processes of 1 torch thread',
        'torch': torch.__version__, 'date': datetime.date.today().isoformat(), 'seeds': sorted(set(seeds)),
        'recipe': RECIPE}
    # the long runs first, so that the two workers finish together
    jobs = [(d, n, bs, s, n_train, n_valid, max_steps) for bs in BATCH_SIZES for s in seeds for d in DATASETS for n in NORMS]
    todo = [j for j in jobs if f'{j[0]}/{j[1]}/bs{j[2]}/seed{j[3]}' not in results['runs']]
    print(f'{len(jobs) - len(todo)} of {len(jobs)} runs done already; {len(todo)} to go on {args.workers} workers', flush=True)
    if args.smoke: print(f'smoke run into {out}', flush=True)
    start = time.perf_counter()
    for i, r in enumerate(finished(todo, args.workers), 1):
        results['runs'][key(r)] = r
        save(results, json_path, md_path)
        elapsed = time.perf_counter() - start
        print(f"[{i}/{len(todo)}, {elapsed / 60:.1f} min] {key(r)}: {r['valid_acc']:.4f} in {r['seconds']:.0f} s"
              + (f" (diverged at {r['diverged_at']})" if r['diverged_at'] else ''), flush=True)
    save(results, json_path, md_path)
    print(md_path.read_text())

if __name__ == '__main__':
    main()
