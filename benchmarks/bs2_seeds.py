"""Notebook 07's batch-size-2 runs (one epoch at a constant lr of 0.4) with other seeds: how noisy one run is.

    EXP_DATA_DIR=../shared/data python benchmarks/bs2_seeds.py RunningBatchNorm 0 1 2 3
    EXP_DATA_DIR=../shared/data python benchmarks/bs2_seeds.py BatchNorm2d 0 1 2 3

The same model (the lesson's: filters 8-16-32-64-64, the last convolution sees 1x1 pixels), data, callbacks and
learning rate as notebook 07's cells, one torch thread; prints one line per seed: the norm, the seed and the
validation accuracy. Each run is about a minute on a 2-core CPU.
"""
import argparse, contextlib, io, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
NFS = [8, 16, 32, 64, 64]   # notebook 07's network, the lesson's
NORMS = {'BatchNorm2d': lambda nb: nb.nn.BatchNorm2d, 'BatchNorm': lambda nb: nb.BatchNorm,
         'GroupNorm': lambda nb: nb.partial(nb.GroupNorm, 4), 'RunningBatchNorm': lambda nb: nb.RunningBatchNorm}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('norm', choices=list(NORMS))
    p.add_argument('seeds', type=int, nargs='+')
    args = p.parse_args(argv)
    import exp.nb_07 as nb
    nb.torch.set_num_threads(1)
    x_train, y_train, x_valid, y_valid = nb.get_data()
    x_train, x_valid = nb.normalize_to(x_train, x_valid)
    data2 = nb.DataBunch(*nb.get_dls(nb.Dataset(x_train, y_train), nb.Dataset(x_valid, y_valid), 2), 10)
    cbfs = [nb.Recorder, nb.partial(nb.AvgStatsCallback, nb.accuracy), nb.DeviceCallback,
            nb.partial(nb.BatchTransformXCallback, nb.mnist_view)]
    for seed in args.seeds:
        nb.torch.manual_seed(seed)
        learn, run = nb.get_learn_run(NFS, data2, 0.4, nb.conv_layer, cbs=cbfs, norm=NORMS[args.norm](nb))
        with contextlib.redirect_stdout(io.StringIO()): run.fit(1, learn)
        print(args.norm, seed, f'{run.avg_stats.valid_stats.avg_stats[1]:.4f}', flush=True)


if __name__ == '__main__':
    main()
