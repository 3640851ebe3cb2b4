"""Train notebook 07's CNN on MNIST on every process torchrun starts, or in one process without torchrun.

    python examples/train_distributed.py                                     # one process
    torchrun --standalone --nproc_per_node=2 examples/train_distributed.py   # 2 processes on this machine
    # 2 machines, 2 processes each: the same command on both, HOST being the first machine's address
    torchrun --nnodes=2 --nproc_per_node=2 --rdzv_id=mnist --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 examples/train_distributed.py

Each process trains on its own GPU (LOCAL_RANK) with NCCL where there is CUDA, else on the CPU with gloo.
`--bs` is the batch of each process: the whole batch is `--bs` times the number of processes. Only rank 0
prints and saves. Copy this file and change `train` to train your own model; see notebook 07b.
"""
import argparse
import tempfile

from exp.nb_07b import *


def train(args):
    x_train, y_train, x_valid, y_valid = main_first(get_data)   # rank 0 first: it may download into the cache
    if args.items: x_train, y_train = x_train[:args.items], y_train[:args.items]
    x_train, x_valid = normalize_to(x_train, x_valid)
    data = DataBunch(*get_dist_dls(Dataset(x_train, y_train), Dataset(x_valid, y_valid), args.bs, seed=args.seed), c=10)
    sched = combine_scheds([0.25, 0.75], [sched_cos(args.lr / 10, args.lr), sched_cos(args.lr, args.lr / 20)])
    cbs = [partial(AvgStatsCallback, accuracy), DeviceCallback, partial(BatchTransformXCallback, mnist_view),
           partial(ParamScheduler, 'lr', sched), DDPCallback]
    torch.manual_seed(args.seed)
    learn, run = get_learn_run([8, 16, 32, 32], data, args.lr, conv_layer, cbs=cbs, norm=SyncBatchNorm)
    run.fit(args.epochs, learn)
    if is_main():
        print(f'{get_world_size()} process(es) x batches of {args.bs}, {len(x_train)} training images, {args.epochs} '
              f'epoch(s): validation accuracy {run.avg_stats.valid_stats.avg_stats[1]:.4f}')
    if args.save: save_model(learn.model, args.save)   # rank 0 writes (a whole file or none), every rank waits for it


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--epochs', type=int, default=1)
    p.add_argument('--bs', type=int, default=64, help='batch size of each process (default 64)')
    p.add_argument('--lr', type=float, default=0.4, help='peak learning rate (default 0.4)')
    p.add_argument('--items', type=int, default=0, help='train on the first N images only (default: all 50,000)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--save', default='', help='save the trained weights to this file')
    p.add_argument('--timeout', type=float, default=DEFAULT_TIMEOUT,
                   help=f'seconds a process waits for the others before it fails (default {DEFAULT_TIMEOUT})')
    args = p.parse_args(argv)
    if args.save and int(os.environ.get('RANK', 0)) == 0: check_save_path(p, args.save)   # before, not after, training
    return args


def check_save_path(parser, path):
    "Stop with a usage error if rank 0 could not write the weights to `path`: a folder that is missing or not writable."
    path = Path(path)
    if path.is_dir(): parser.error(f'--save {path}: that is a folder; give a file name, such as {path / "weights.pt"}')
    if not path.parent.is_dir(): parser.error(f'--save {path}: no such folder {path.parent}; create it first')
    try: tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as e: parser.error(f'--save {path}: cannot write in {path.parent} ({e.strerror})')


if __name__ == '__main__':
    args = parse_args()
    init_distributed(timeout=args.timeout)                  # does nothing without torchrun
    run_in_group(train, (args,), timeout=args.timeout)
