"""The lesson's own cells run against exp, as a student types them after `from exp.nb_XX import *`.

Each test executes, in a fresh namespace, the code of the lesson's notebooks 05b, 06 and 07 as the lesson
shows it (its names and signatures, from ../shared/DESIGN.md and the lesson's notes in ../shared/seeds/):
notebook-local definitions included, the exported ones taken from exp. Two changes, both for time: the data
is a slice of MNIST, and fits are shorter. The star import alone must provide torch, nn, F, optim, partial,
plt, math and the rest of what the lesson's cells use.
"""
import os
import warnings

import matplotlib
import pytest

matplotlib.use('Agg')
needs_data = pytest.mark.skipif(not os.environ.get('EXP_DATA_DIR'),
                                reason='the lesson cells read MNIST: set EXP_DATA_DIR to the folder holding mnist/')

DATA = '''
x_train,y_train,x_valid,y_valid = get_data()
x_train,y_train,x_valid,y_valid = x_train[:LESSON_N_TRAIN],y_train[:LESSON_N_TRAIN],x_valid[:LESSON_N_VALID],y_valid[:LESSON_N_VALID]
'''


def run_cells(module, code, n_train=2000, n_valid=500):
    "Execute `code` after `from exp.<module> import *`, as a notebook would; return its namespace."
    ns = {'LESSON_N_TRAIN': n_train, 'LESSON_N_VALID': n_valid}
    exec(f'from exp.{module} import *', ns)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # CudaCallback on a CPU machine, LR_Find running out of data
        exec(compile(DATA + code, f'lesson cells of {module}', 'exec'), ns)
    matplotlib.pyplot.close('all')
    return ns


LESSON_05B = '''
train_ds,valid_ds = Dataset(x_train, y_train),Dataset(x_valid, y_valid)
nh,bs = 50,512
c = y_train.max().item()+1
loss_func = F.cross_entropy
data = DataBunch(*get_dls(train_ds, valid_ds, bs), c)
learn = create_learner(get_model, loss_func, data)

class TestCallback(Callback):
    _order=1
    def after_step(self):
        print(self.n_iter)
        if self.n_iter>=10: raise CancelTrainException()

run = Runner(cb_funcs=TestCallback)
run.fit(3, learn)
steps_taken = run.n_iter

learn = create_learner(get_model_func(0.5), loss_func, data)
run = Runner(cb_funcs=[LR_Find, Recorder])
run.fit(2, learn)
run.recorder.plot(skip_last=5)
run.recorder.plot_lr()
'''


@needs_data
def test_lesson_05b_cells(capsys):
    ns = run_cells('nb_05b', LESSON_05B)
    assert ns['steps_taken'] == 11   # steps 0..10; the exception after step 10 stops the fit
    assert capsys.readouterr().out.split() == [str(i) for i in range(11)]
    run = ns['run']
    assert len(run.recorder.lrs[0]) == 8 and run.recorder.lrs[0][0] == pytest.approx(1e-6)   # 2 epochs of 4 batches
    assert isinstance(run.lr_find, ns['LR_Find'])


LESSON_06 = '''
x_train,x_valid = normalize_to(x_train,x_valid)
train_ds,valid_ds = Dataset(x_train, y_train),Dataset(x_valid, y_valid)
nh,bs = 50,512
c = y_train.max().item()+1
loss_func = F.cross_entropy
data = DataBunch(*get_dls(train_ds, valid_ds, bs), c)

mnist_view = view_tfm(1,28,28)
cbfs = [Recorder, partial(AvgStatsCallback,accuracy), CudaCallback, partial(BatchTransformXCallback, mnist_view)]
nfs = [8,16,32,32]

def get_cnn_layers(data, nfs):
    nfs = [1] + nfs
    return [conv2d(nfs[i], nfs[i+1], 5 if i==0 else 3) for i in range(len(nfs)-1)] + [
        nn.AdaptiveAvgPool2d(1), Lambda(flatten), nn.Linear(nfs[-1], data.c)]
def get_cnn_model(data, nfs): return nn.Sequential(*get_cnn_layers(data, nfs))
def get_runner(model, data, lr=0.6, cbs=None, opt_func=None, loss_func = F.cross_entropy):
    if opt_func is None: opt_func = optim.SGD
    opt = opt_func(model.parameters(), lr=lr)
    learn = Learner(model, opt, loss_func, data)
    return learn, Runner(cb_funcs=listify(cbs))

model = get_cnn_model(data, nfs)
learn,run = get_runner(model, data, lr=0.4, cbs=cbfs)
run.fit(1, learn)

hooks = [Hook(l, append_stats) for l in children(model[:4])]
run.fit(1, learn)
for h in hooks:
    plt.plot(h.stats[0])
    h.remove()
plt.legend(range(4));
steps_per_hook = [len(h.stats[0]) for h in hooks]

with Hooks(model, append_stats) as hooks:
    run.fit(2, learn)
    fig,(ax0,ax1) = plt.subplots(1,2, figsize=(10,4))
    for h in hooks:
        ms,ss = h.stats
        ax0.plot(ms[:10])
        ax1.plot(ss[:10])
    plt.legend(range(6));
first_means = hooks[0].stats[0][:10]

for l in model:
    if isinstance(l, nn.Sequential):
        init.kaiming_normal_(l[0].weight)
        l[0].bias.data.zero_()

def get_cnn_layers(data, nfs, layer, **kwargs):
    nfs = [1] + nfs
    return [layer(nfs[i], nfs[i+1], 5 if i==0 else 3, **kwargs) for i in range(len(nfs)-1)] + [
        nn.AdaptiveAvgPool2d(1), Lambda(flatten), nn.Linear(nfs[-1], data.c)]
def get_cnn_model(data, nfs, layer, **kwargs): return nn.Sequential(*get_cnn_layers(data, nfs, layer, **kwargs))

model = get_cnn_model(data, nfs, conv_layer, leak=0.1, sub=0.4, maxv=6.)
init_cnn(model)
learn,run = get_runner(model, data, lr=0.9, cbs=cbfs)
with Hooks(model, append_stats) as hooks:
    run.fit(1, learn)
    fig,(ax0,ax1) = plt.subplots(1,2, figsize=(10,4))
    for h in hooks[:-1]:
        ms,ss = h.stats
        ax0.plot(ms[:10])
        ax1.plot(ss[:10])
hooks_left = sum(len(m._forward_hooks) for m in model.modules())

torch.manual_seed(0)
sched = combine_scheds([0.5, 0.5], [sched_cos(0.2, 1.), sched_cos(1., 0.1)])
learn,run = get_learn_run(nfs, data, 1., conv_layer, leak=0.1, sub=0.4, maxv=6., cbs=cbfs+[partial(ParamScheduler,'lr', sched)])
run.fit(4, learn)
final_acc = run.avg_stats.valid_stats.avg_stats[1]
'''


@needs_data
def test_lesson_06_cells():
    ns = run_cells('nb_06', LESSON_06)
    assert ns['steps_per_hook'] == [4, 4, 4, 4]      # 2,000 images in batches of 512
    assert len(ns['first_means']) == 8 and ns['hooks_left'] == 0
    assert ns['final_acc'] > 0.5                      # 4 epochs on 2,000 images; chance is 0.1


LESSON_07 = '''
x_train,x_valid = normalize_to(x_train,x_valid)
train_ds,valid_ds = Dataset(x_train, y_train),Dataset(x_valid, y_valid)
nh,bs = 50,512
c = y_train.max().item()+1
loss_func = F.cross_entropy
data = DataBunch(*get_dls(train_ds, valid_ds, bs), c)
mnist_view = view_tfm(1,28,28)
cbfs = [Recorder, partial(AvgStatsCallback,accuracy), CudaCallback, partial(BatchTransformXCallback, mnist_view)]
nfs = [8,16,32,64,64]
acc = {}

def conv_layer(ni, nf, ks=3, stride=2, bn=True, **kwargs):
    layers = [nn.Conv2d(ni, nf, ks, padding=ks//2, stride=stride, bias=not bn), GeneralRelu(**kwargs)]
    if bn: layers.append(BatchNorm(nf))
    return nn.Sequential(*layers)

torch.manual_seed(0)
learn,run = get_learn_run(nfs, data, 0.9, conv_layer, cbs=cbfs)
with Hooks(learn.model, append_stats) as hooks:
    run.fit(1, learn)
    fig,(ax0,ax1) = plt.subplots(1,2, figsize=(10,4))
    for h in hooks[:-1]:
        ms,ss = h.stats
        ax0.plot(ms[:10])
        ax1.plot(ss[:10])
        h.remove()
    plt.legend(range(6));
stds_seen = [float(h.stats[1][0]) for h in hooks[:5]]

torch.manual_seed(0)
learn,run = get_learn_run(nfs, data, 1.0, conv_layer, cbs=cbfs)
run.fit(3, learn)
acc['BatchNorm'] = run.avg_stats.valid_stats.avg_stats[1]

def conv_layer(ni, nf, ks=3, stride=2, bn=True, **kwargs):
    layers = [nn.Conv2d(ni, nf, ks, padding=ks//2, stride=stride, bias=not bn), GeneralRelu(**kwargs)]
    if bn: layers.append(nn.BatchNorm2d(nf, eps=1e-5, momentum=0.1))
    return nn.Sequential(*layers)
sched = combine_scheds([0.3, 0.7], [sched_lin(0.6, 2.), sched_lin(2., 0.1)])
torch.manual_seed(0)
learn,run = get_learn_run(nfs, data, 0.9, conv_layer, cbs=cbfs+[partial(ParamScheduler,'lr', sched)])
run.fit(3, learn)
acc['nn.BatchNorm2d'] = run.avg_stats.valid_stats.avg_stats[1]

def conv_ln(ni, nf, ks=3, stride=2, bn=True, **kwargs):
    layers = [nn.Conv2d(ni, nf, ks, padding=ks//2, stride=stride, bias=True), GeneralRelu(**kwargs)]
    if bn: layers.append(LayerNorm())
    return nn.Sequential(*layers)
learn,run = get_learn_run(nfs, data, 0.8, conv_ln, cbs=cbfs)
run.fit(1, learn)

def conv_in(ni, nf, ks=3, stride=2, bn=True, **kwargs):
    layers = [nn.Conv2d(ni, nf, ks, padding=ks//2, stride=stride, bias=True), GeneralRelu(**kwargs)]
    if bn: layers.append(InstanceNorm(nf))
    return nn.Sequential(*layers)
learn,run = get_learn_run(nfs, data, 0.1, conv_in, cbs=cbfs)
run.fit(1, learn)

small_ds = Dataset(x_train[:200], y_train[:200])
data = DataBunch(*get_dls(small_ds, valid_ds, 2), c)
def conv_layer(ni, nf, ks=3, stride=2, bn=True, **kwargs):
    layers = [nn.Conv2d(ni, nf, ks, padding=ks//2, stride=stride, bias=not bn), GeneralRelu(**kwargs)]
    if bn: layers.append(BatchNorm(nf, eps=1e-5, mom=0.1))
    return nn.Sequential(*layers)
learn,run = get_learn_run(nfs, data, 0.4, conv_layer, cbs=cbfs)
run.fit(1, learn)

def conv_rbn(ni, nf, ks=3, stride=2, bn=True, **kwargs):
    layers = [nn.Conv2d(ni, nf, ks, padding=ks//2, stride=stride, bias=not bn), GeneralRelu(**kwargs)]
    if bn: layers.append(RunningBatchNorm(nf))
    return nn.Sequential(*layers)
torch.manual_seed(0)
learn,run = get_learn_run(nfs, data, 0.4, conv_rbn, cbs=cbfs)
run.fit(1, learn)
rbn_loss = run.avg_stats.valid_stats.avg_stats[0]

data = DataBunch(*get_dls(train_ds, valid_ds, 32), c)
torch.manual_seed(0)
learn,run = get_learn_run(nfs, data, 0.9, conv_rbn, cbs=cbfs+[partial(ParamScheduler,'lr', sched_lin(1., 0.2))])
run.fit(1, learn)
acc['RunningBatchNorm, bs 32'] = run.avg_stats.valid_stats.avg_stats[1]
'''


@needs_data
def test_lesson_07_cells():
    import math
    ns = run_cells('nb_07', LESSON_07)
    assert all(0.5 < s < 2 for s in ns['stds_seen']), ns['stds_seen']   # batch norm: unit std from the first step
    assert all(a > 0.5 for a in ns['acc'].values()), ns['acc']        # chance is 0.1
    assert math.isfinite(ns['rbn_loss'])                               # RunningBatchNorm at batch size 2
