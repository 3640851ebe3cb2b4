"""The sequence as a whole: each notebook imports the one before it, the lesson modules stay lesson-sized, and
no public name a learner relied on before the re-cut into lesson and engineering chapters (issue 22) is lost."""
import importlib
import re

import nbformat
import pytest

from nbtools import NBS, EXP, number, numbered_notebooks

# What `from exp.nb_07 import *` gave before the re-cut: 07b now imports nb_07a, which must give all of it.
NB_07_NAMES = """
    ActivationStatsCallback AvgStats AvgStatsCallback BatchNorm BatchTransformXCallback Callback
    CancelBatchException CancelEpochException CancelTrainException CorruptFileError CudaCallback
    DATASETS DOWNLOAD_DEADLINE DOWNLOAD_TIMEOUT DataBunch DataLoader DataUnavailableError Dataset
    DeviceCallback F FastRunningBatchNorm GeneralRelu GroupNorm Hook Hooks InstanceNorm LR_Find
    Lambda LayerNorm Learner ListContainer MIRRORS N_TRAIN N_VALID PROGRESS_MODES ParamScheduler
    Path ProgressCallback Recorder Runner RunningBatchNorm SHA256 SIZES Sampler StatsTape
    StopOnNanCallback TRAIN_IMAGES TRAIN_LABELS TapeView TrainEvalCallback accuracy add_note
    annealer append_hist append_stats append_stats_and_hist binary_cross_entropy_with_logits
    camel2snake check_cb_args check_cb_name check_dtype check_epochs check_hyper_param check_nchw
    check_recorded children collate combine_scheds conv2d conv_layer cos_1cycle_anneal
    create_learner dataset_name debiased_ewma default_device equals flatten format_time
    get_cnn_layers get_cnn_model get_data get_dls get_hist get_learn_run get_min get_model
    get_model_func get_runner histogram hook_stats in_notebook init init_cnn init_cnn_ is_tty
    layer_name listify log_softmax logsumexp math mean_std means_stds mnist_resize mnist_view
    moments multilabel_loss near nn normalize normalize_to optim os output_tensor parse_idx partial
    plot_hists plot_hooks_stats plot_mins plt progress_mode quick_mode quick_subset re read_idx
    sched_cos sched_exp sched_lin sched_no tensor test test_eq test_near test_near_zero text_output
    torch torch_threads view_tfm warnings
""".split()

# What `from exp.nb_07b import *` added to it: the last module of the sequence must still give these.
NB_07B_NAMES = """
    AllReduceGradsCallback AllReduceSum CANCELS DDP DDPCallback DEFAULT_TIMEOUT DistLateCallback
    DistributedCallback FaultCallback RankFailedError RankResults RankTimeoutError ShardSampler
    SyncBatchNorm SyncRunningBatchNorm all_reduce_demo all_reduce_sum comm_device contextlib
    datetime dist dist_backend error_line first_error fit_worker fit_workers get_dist_dls get_rank
    get_world_size init_distributed io is_dist is_main launch local_device logging main_first mp
    reduce_avg_stats reduce_sums run_in_group save_model sync_batch_stats sys tempfile time
    traceback
""".split()

# The lesson modules: at most the lines (not blank), the course's own being 146, 109 and 55.
LESSON_SIZES = {'nb_05b': 180, 'nb_06': 160, 'nb_07': 150}


def star(module):
    return set(importlib.import_module(f'exp.{module}').__all__)


def test_the_module_07b_imports_gives_every_name_nb_07_gave():
    first = [c.source for c in nbformat.read(NBS / '07b_distributed.ipynb', as_version=4).cells
             if c.cell_type == 'code' and c.source.startswith('#export')][0]
    imported = re.search(r'from exp\.(nb_\w+) import \*', first).group(1)
    assert not set(NB_07_NAMES) - star(imported)


def test_the_last_module_gives_every_name_nb_07b_gave():
    last = f'nb_{number(numbered_notebooks(NBS)[-1])}'
    assert not set(NB_07_NAMES + NB_07B_NAMES) - star(last)


def test_each_notebook_imports_the_one_before_it():
    books = numbered_notebooks(NBS)
    for before, nb in zip(books, books[1:]):
        first = [c.source for c in nbformat.read(nb, as_version=4).cells
                 if c.cell_type == 'code' and c.source.startswith('#export')][0]
        assert f'from exp.nb_{number(before)} import *' in first, nb.name


@pytest.mark.parametrize('module', LESSON_SIZES)
def test_the_lesson_modules_are_lesson_sized(module):
    lines = [l for l in (EXP / f'{module}.py').read_text().splitlines() if l.strip()]   # as `grep -c .` counts
    assert len(lines) <= LESSON_SIZES[module], f'{module}: {len(lines)} non-blank lines'
