"Tests of the data loading in exp.nb_00: the idx parser, the real data, and downloads from a local HTTP server."
import gzip, hashlib, http.server, os, re, socket, struct, threading, time, tracemalloc, zlib
from pathlib import Path
from types import SimpleNamespace

import pytest, torch

import exp.nb_00 as nb
from exp.nb_00 import CorruptFileError, DataUnavailableError, dataset_name, get_data, parse_idx, read_idx

IMAGES, LABELS = 'train-images-idx3-ubyte', 'train-labels-idx1-ubyte'
FILES = (IMAGES, LABELS, 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')

def shared_data():
    "The folder with the real data: `EXP_DATA_DIR` if set, else ../shared/data next to the repo."
    env = os.environ.get('EXP_DATA_DIR')
    return (Path(env) if env else Path(__file__).resolve().parents[1].parent/'shared'/'data').resolve()

REAL = shared_data()
HAS_REAL = all((REAL/ds/f'{f}.gz').is_file() for ds in ('mnist', 'fashion-mnist') for f in FILES)
needs_real = pytest.mark.skipif(not HAS_REAL, reason=f'real MNIST/Fashion-MNIST not found in {REAL}; set EXP_DATA_DIR')

def idx_bytes(t):
    "The bytes of an idx file holding the uint8 tensor `t`."
    return bytes([0, 0, 8, t.dim()]) + struct.pack(f'>{t.dim()}I', *t.shape) + bytes(t.flatten().tolist())

def write_gz(fn, data, level=9):
    "Write `data` gzip-compressed to `fn`; return `fn`."
    fn.parent.mkdir(parents=True, exist_ok=True)
    fn.write_bytes(gzip.compress(data, compresslevel=level))
    return fn

# A tiny MNIST look-alike: 6 images split 4 / 2, with checksums patched in.
FAKE_IMAGES = (torch.arange(6*28*28) % 251).to(torch.uint8).reshape(6, 28, 28)
FAKE_LABELS = torch.tensor([5, 0, 4, 1, 9, 2], dtype=torch.uint8)
FAKE = {IMAGES: idx_bytes(FAKE_IMAGES), LABELS: idx_bytes(FAKE_LABELS)}

@pytest.fixture
def fake(tmp_path, monkeypatch):
    "Use the tiny dataset with an empty cache in tmp_path, no EXP_DATA_DIR and no mirrors."
    monkeypatch.setattr(nb, 'N_TRAIN', 4)
    monkeypatch.setattr(nb, 'N_VALID', 2)
    monkeypatch.setitem(nb.SHA256, 'mnist', {f: hashlib.sha256(d).hexdigest() for f, d in FAKE.items()})
    monkeypatch.setattr(nb, 'MIRRORS', {'mnist': [], 'fashion-mnist': []})
    monkeypatch.delenv('EXP_DATA_DIR', raising=False)
    monkeypatch.setenv('EXP_CACHE_DIR', str(tmp_path/'cache'))
    return tmp_path/'cache'/'mnist'

@pytest.fixture
def server(tmp_path):
    "A quiet HTTP server on 127.0.0.1 serving tmp_path/'www', recording the paths requested."
    root, requests = tmp_path/'www', []
    root.mkdir()
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs): super().__init__(*args, directory=str(root), **kwargs)
        def log_message(self, *args): pass
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True).start()
    def mirror(name, files=FAKE, level=9):
        "Publish `files` gzipped under /name/ and return that mirror's base URL."
        for fname, data in files.items(): write_gz(root/name/f'{fname}.gz', data, level)
        return f'http://127.0.0.1:{httpd.server_port}/{name}/'
    yield SimpleNamespace(root=root, mirror=mirror, requests=requests, url=f'http://127.0.0.1:{httpd.server_port}/')
    httpd.shutdown()
    httpd.server_close()

def closed_port_url():
    "The URL of a port on 127.0.0.1 that nothing listens on."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return f'http://127.0.0.1:{s.getsockname()[1]}/'

def use_mirrors(monkeypatch, *urls): monkeypatch.setitem(nb.MIRRORS, 'mnist', list(urls))

# ---- read_idx on small synthetic files

def test_read_idx_good(tmp_path):
    t = torch.arange(2*3*4, dtype=torch.uint8).reshape(2, 3, 4)
    (tmp_path/'a-idx3-ubyte').write_bytes(idx_bytes(t))
    write_gz(tmp_path/'a-idx3-ubyte.gz', idx_bytes(t))
    for fn in ('a-idx3-ubyte', 'a-idx3-ubyte.gz'):
        r = read_idx(tmp_path/fn)
        assert r.dtype == torch.uint8 and r.shape == (2, 3, 4)
        assert torch.equal(r, t)
    labels = torch.tensor([7, 0, 255], dtype=torch.uint8)
    (tmp_path/'l').write_bytes(idx_bytes(labels))
    assert read_idx(tmp_path/'l').tolist() == [7, 0, 255]
    assert torch.equal(parse_idx(idx_bytes(t)), t)
    assert parse_idx(idx_bytes(torch.zeros(0, 28, 28, dtype=torch.uint8))).shape == (0, 28, 28)

def test_read_idx_bad_magic(tmp_path):
    good = idx_bytes(torch.zeros(2, 2, dtype=torch.uint8))
    for i, bad in enumerate([b'\x00\x00\x0d' + good[3:], b'\x01' + good[1:], b'\x1f\x8b']):  # float dtype, junk, too short
        fn = tmp_path/f'bad{i}'
        fn.write_bytes(bad)
        with pytest.raises(ValueError, match=re.escape(str(fn)) + '.*magic number'): read_idx(fn)

def test_read_idx_truncated(tmp_path):
    data = idx_bytes(torch.ones(3, 5, 5, dtype=torch.uint8))
    fn = tmp_path/'short'
    fn.write_bytes(data[:-7])
    with pytest.raises(ValueError, match=re.escape(str(fn)) + r'.*\(3, 5, 5\).*truncated'): read_idx(fn)
    (tmp_path/'long').write_bytes(data + b'\0')
    with pytest.raises(ValueError, match='truncated or corrupt'): read_idx(tmp_path/'long')
    (tmp_path/'header').write_bytes(data[:9])
    with pytest.raises(ValueError, match='truncated idx header'): read_idx(tmp_path/'header')
    gz = tmp_path/'short.gz'
    gz.write_bytes(gzip.compress(data)[:-20])
    with pytest.raises(ValueError, match=re.escape(str(gz)) + '.*truncated gzip'): read_idx(gz)

class CountingZlib:
    "Stands in for `zlib` in exp.nb_00: counts the bytes every decompressor gives out."
    def __init__(self): self.out = 0
    def __getattr__(self, name): return getattr(zlib, name)
    def decompressobj(self, *args, **kwargs):
        real, counter = zlib.decompressobj(*args, **kwargs), self
        class Counted:
            def decompress(self, data, max_length=0):
                out = real.decompress(data, max_length); counter.out += len(out); return out
            def __getattr__(self, name): return getattr(real, name)
        return Counted()

def test_read_idx_inflates_no_more_than_the_header_declares(tmp_path, monkeypatch):
    counting = CountingZlib()
    monkeypatch.setattr(nb, 'zlib', counting)
    zeros = write_gz(tmp_path/'zeros.gz', bytes(20 * 2**20))  # 20 MB of zeros: not even an idx header
    with pytest.raises(CorruptFileError, match=re.escape(str(zeros)) + '.*not an idx file'): read_idx(zeros)
    assert counting.out <= 2000, f'{counting.out:,} bytes inflated to find the header wrong'
    counting.out = 0
    header = bytes([0, 0, 8, 1, 0, 0, 0, 10])  # 10 labels, then 20 MB more
    bomb = write_gz(tmp_path/'bomb.gz', header + bytes(20 * 2**20))
    with pytest.raises(CorruptFileError, match=r'more than 18 bytes, the size its idx header declares'): read_idx(bomb)
    assert counting.out <= 2000 + 19
    huge = write_gz(tmp_path/'huge.gz', bytes([0, 0, 8, 2, 0x7f, 0, 0, 0, 0x7f, 0, 0, 0]) + bytes(100))
    with pytest.raises(CorruptFileError, match=r'header declares .* bytes, more than .* bytes of gzip can hold'):
        read_idx(huge)
    t = (torch.arange(3000) % 256).to(torch.uint8).reshape(3, 1000)
    assert torch.equal(read_idx(write_gz(tmp_path/'good.gz', idx_bytes(t))), t)  # 3 KB: more than the header read

def test_read_idx_of_a_gzip_bomb_keeps_memory_small(tmp_path):
    bomb = write_gz(tmp_path/'bomb.gz', bytes([0, 0, 8, 1, 0, 0, 0, 10]) + bytes(100 * 2**20))  # 100 KB of gzip
    error, peak = peak_memory(read_idx, bomb)
    assert isinstance(error, CorruptFileError) and 'the size its idx header declares' in str(error)
    assert peak < 4 * 2**20, f'{peak:,} bytes of memory for a file of {bomb.stat().st_size:,} bytes'

def test_dataset_names():
    assert dataset_name('mnist') == dataset_name('MNIST') == 'mnist'
    assert dataset_name('fashion_mnist') == dataset_name('fashion-mnist') == 'fashion-mnist'
    with pytest.raises(ValueError, match="'mnist'.*'fashion_mnist'"): get_data('cifar10')

def test_dataset_name_of_none_is_a_clear_error():
    for bad in (None, 3, ['mnist']):
        with pytest.raises(ValueError, match=re.escape(f'Unknown dataset {bad!r}') + ".*'mnist'.*'fashion_mnist'"):
            dataset_name(bad)
    with pytest.raises(ValueError, match="Unknown dataset None"): get_data(None)

def test_gzip_of_several_members_is_read_whole(tmp_path):
    t = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    data = idx_bytes(t)
    fn = tmp_path/'two-members.gz'
    fn.write_bytes(gzip.compress(data[:10]) + gzip.compress(data[10:]))  # what `cat a.gz b.gz` gives
    assert torch.equal(read_idx(fn), t)

# ---- the real data (read-only, from EXP_DATA_DIR)

@pytest.fixture(scope='module')
def real_env():
    "EXP_DATA_DIR at the real data; no mirrors, so nothing is downloaded by mistake."
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('EXP_DATA_DIR', str(REAL))
        mp.setattr(nb, 'MIRRORS', {'mnist': [], 'fashion-mnist': []})
        yield mp

def check_split(data, first_labels):
    x_train, y_train, x_valid, y_valid = data
    assert x_train.shape == (50000, 784) and x_valid.shape == (10000, 784)
    assert y_train.shape == (50000,) and y_valid.shape == (10000,)
    assert x_train.dtype == x_valid.dtype == torch.float32
    assert y_train.dtype == y_valid.dtype == torch.int64
    for x in (x_train, x_valid): assert x.min() == 0 and x.max() == 1
    assert y_train[:10].tolist() == first_labels
    assert sorted(y_train.unique().tolist()) == list(range(10))

@needs_real
def test_real_mnist(real_env):
    data = get_data()
    check_split(data, [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
    x_train, y_train, x_valid, y_valid = data
    # the validation set is training images 50000:60000, not the t10k test set
    all_images = read_idx(REAL/'mnist'/f'{IMAGES}.gz')
    assert torch.equal(x_valid[0], all_images[50000].flatten().float()/255)
    assert torch.equal(x_train[-1], all_images[49999].flatten().float()/255)
    assert y_valid[:5].tolist() == read_idx(REAL/'mnist'/f'{LABELS}.gz')[50000:50005].tolist()
    assert abs(x_train.mean().item() - 0.1304) < 1e-3  # the lesson's train mean

@needs_real
def test_real_fashion_mnist(real_env):
    data = get_data('fashion_mnist')
    check_split(data, [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])
    mnist_labels = read_idx(REAL/'mnist'/f'{LABELS}.gz')[:50000].long()
    assert not torch.equal(data[1], mnist_labels)

@needs_real
def test_real_path_takes_precedence(tmp_path, monkeypatch):
    bad = write_gz(tmp_path/'mnist'/f'{IMAGES}.gz', b'not mnist')
    write_gz(tmp_path/'mnist'/f'{LABELS}.gz', b'not mnist')
    monkeypatch.setenv('EXP_DATA_DIR', str(tmp_path))
    monkeypatch.setattr(nb, 'MIRRORS', {'mnist': [], 'fashion-mnist': []})
    with pytest.raises(CorruptFileError, match=re.escape(str(bad))): get_data()
    for path in (REAL, REAL/'mnist'):  # the parent folder, or the dataset's own folder
        x_train, y_train, x_valid, y_valid = get_data('mnist', path=path)
        assert x_train.shape == (50000, 784) and y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]

# ---- downloads, from a local HTTP server

def test_download_lands_in_cache_and_is_reused(fake, server, monkeypatch, capsys):
    use_mirrors(monkeypatch, server.mirror('good'))
    assert nb._download('mnist', LABELS) == FAKE[LABELS]
    assert server.requests == [f'/good/{LABELS}.gz']
    assert gzip.decompress((fake/f'{LABELS}.gz').read_bytes()) == FAKE[LABELS]
    assert f'Downloading {LABELS}.gz from {server.url}good/' in capsys.readouterr().out
    assert nb._load('mnist', LABELS) == FAKE[LABELS]
    assert len(server.requests) == 1
    assert sorted(p.name for p in fake.iterdir()) == [f'{LABELS}.gz']

def test_get_data_end_to_end(fake, server, monkeypatch):
    use_mirrors(monkeypatch, server.mirror('good'))
    x_train, y_train, x_valid, y_valid = get_data()
    assert x_train.shape == (4, 784) and x_valid.shape == (2, 784)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert torch.equal(x_train[1], FAKE_IMAGES[1].flatten().float()/255)
    assert torch.equal(x_valid[0], FAKE_IMAGES[4].flatten().float()/255)
    assert y_train.tolist() == [5, 0, 4, 1] and y_valid.tolist() == [9, 2]
    assert len(server.requests) == 2
    again = get_data()  # from the cache
    assert len(server.requests) == 2
    assert all(torch.equal(a, b) for a, b in zip(again, (x_train, y_train, x_valid, y_valid)))

def test_corrupt_mirror_falls_through(fake, server, monkeypatch, capsys):
    bad = server.mirror('bad', {LABELS: FAKE[LABELS][:-1] + b'\x07'})
    use_mirrors(monkeypatch, bad, server.mirror('good'))
    assert nb._download('mnist', LABELS) == FAKE[LABELS]
    assert server.requests == [f'/bad/{LABELS}.gz', f'/good/{LABELS}.gz']
    out = capsys.readouterr().out
    assert f'from {bad}\n  failed: checksum mismatch' in out
    assert [p.name for p in fake.iterdir()] == [f'{LABELS}.gz']  # no temporary files left

def test_truncated_gzip_falls_through(fake, server, monkeypatch, capsys):
    trunc = server.mirror('trunc')
    www = server.root/'trunc'/f'{LABELS}.gz'
    www.write_bytes(www.read_bytes()[:-30])
    use_mirrors(monkeypatch, trunc, server.mirror('good'))
    assert nb._download('mnist', LABELS) == FAKE[LABELS]
    assert f'from {trunc}\n  failed: truncated gzip' in capsys.readouterr().out
    assert [p.name for p in fake.iterdir()] == [f'{LABELS}.gz']

def test_dead_mirrors_fall_through(fake, server, monkeypatch):
    use_mirrors(monkeypatch, closed_port_url(), server.url + 'missing/', server.mirror('good'))
    assert nb._download('mnist', IMAGES) == FAKE[IMAGES]
    assert server.requests == [f'/missing/{IMAGES}.gz', f'/good/{IMAGES}.gz']

def test_hanging_mirror_times_out(fake, server, monkeypatch):
    with socket.socket() as hang:  # accepts connections (backlog) but never answers
        hang.bind(('127.0.0.1', 0))
        hang.listen(1)
        monkeypatch.setattr(nb, 'DOWNLOAD_TIMEOUT', 0.5)
        use_mirrors(monkeypatch, f'http://127.0.0.1:{hang.getsockname()[1]}/', server.mirror('good'))
        assert nb._download('mnist', LABELS) == FAKE[LABELS]

def test_corrupt_cache_is_reported_and_fetched_again(fake, server, monkeypatch):
    use_mirrors(monkeypatch, server.mirror('good'))
    cached = write_gz(fake/f'{LABELS}.gz', b'garbage')
    with pytest.warns(UserWarning, match=re.escape(str(cached)) + '.*checksum mismatch'):
        assert nb._load('mnist', LABELS) == FAKE[LABELS]
    assert server.requests == [f'/good/{LABELS}.gz']
    assert gzip.decompress(cached.read_bytes()) == FAKE[LABELS]
    cached.write_bytes(cached.read_bytes()[:-10])
    with pytest.warns(UserWarning, match=re.escape(str(cached)) + '.*truncated gzip'):
        assert nb._load('mnist', LABELS) == FAKE[LABELS]
    assert len(server.requests) == 2
    cached.write_bytes(b'junk')
    use_mirrors(monkeypatch, server.url + 'missing/')
    with pytest.warns(UserWarning, match='downloading a good copy'), pytest.raises(DataUnavailableError):
        nb._load('mnist', LABELS)

def test_all_mirrors_dead_is_one_clear_error(fake, server, monkeypatch):
    dead, missing = closed_port_url(), server.url + 'missing/'
    use_mirrors(monkeypatch, dead, missing)
    with pytest.raises(DataUnavailableError) as e: get_data()
    msg = str(e.value)
    assert isinstance(e.value, RuntimeError)
    assert f'mnist/{IMAGES}.gz' in msg and str(fake) in msg  # the file, and the cache it is not in
    assert f'{dead}{IMAGES}.gz: ' in msg and re.search(re.escape(f'{missing}{IMAGES}.gz: ') + '.*404', msg)
    assert 'set EXP_DATA_DIR' in msg  # what to do without a network
    assert not fake.exists() or not any(fake.iterdir())

@pytest.mark.parametrize('wrong', ['misspelt', 'folder instead of a file'])
def test_exp_data_dir_without_the_file_is_an_error_not_a_download(fake, server, monkeypatch, tmp_path, wrong):
    use_mirrors(monkeypatch, server.mirror('good'))
    data = tmp_path/'data'
    write_gz(data/'mnist'/f'{IMAGES}.gz', FAKE[IMAGES])
    if wrong == 'misspelt':
        monkeypatch.setenv('EXP_DATA_DIR', str(tmp_path/'dat'))
        looked_for, what = tmp_path/'dat'/'mnist'/f'{IMAGES}.gz', 'does not exist'
    else:
        (data/'mnist'/f'{LABELS}.gz').mkdir()
        monkeypatch.setenv('EXP_DATA_DIR', str(data))
        looked_for, what = data/'mnist'/f'{LABELS}.gz', 'is a folder, not a file'
    with pytest.raises(FileNotFoundError) as e: get_data()
    msg = str(e.value)
    assert msg.startswith(f'EXP_DATA_DIR is {looked_for.parents[1]}, but {looked_for} {what}.')
    assert 'unset EXP_DATA_DIR to download' in msg
    assert server.requests == [] and not fake.exists()  # nothing downloaded behind the user's back

def test_any_gzip_level_is_accepted(fake, server, monkeypatch):
    fast, small = server.mirror('fast', level=1), server.mirror('small', level=9)
    root = server.root
    assert (root/'fast'/f'{IMAGES}.gz').read_bytes() != (root/'small'/f'{IMAGES}.gz').read_bytes()
    use_mirrors(monkeypatch, fast)
    assert nb._download('mnist', IMAGES) == FAKE[IMAGES]
    assert (fake/f'{IMAGES}.gz').read_bytes() == (root/'fast'/f'{IMAGES}.gz').read_bytes()
    (fake/f'{IMAGES}.gz').unlink()
    use_mirrors(monkeypatch, small)
    assert nb._download('mnist', IMAGES) == FAKE[IMAGES]

def test_corrupt_user_data_is_left_alone(fake, server, monkeypatch, tmp_path):
    use_mirrors(monkeypatch, server.mirror('good'))
    write_gz(tmp_path/'data'/'mnist'/f'{IMAGES}.gz', FAKE[IMAGES])
    bad = write_gz(tmp_path/'data'/'mnist'/f'{LABELS}.gz', FAKE[LABELS][:-1])
    before = bad.read_bytes()
    monkeypatch.setenv('EXP_DATA_DIR', str(tmp_path/'data'))
    with pytest.raises(CorruptFileError, match=re.escape(str(bad)) + '.*checksum mismatch.*unset EXP_DATA_DIR'):
        get_data()
    with pytest.raises(CorruptFileError, match=re.escape(str(bad)) + '.*another path'):
        get_data(path=tmp_path/'data')
    assert bad.read_bytes() == before
    assert server.requests == [] and not fake.exists()
    x_train, *_ = get_data(path=server.root/'good')  # path= beats EXP_DATA_DIR
    assert x_train.shape == (4, 784)

def test_missing_path_is_an_error(fake, tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path/'nope'))): get_data(path=tmp_path/'nope')

# ---- reliability: a deadline per file, a read-only cache, nothing half-written

def finishes_within(seconds, f, *args):
    "`f(*args)` run in a thread: its result or exception; fail (rather than hang) if it is still running after `seconds`."
    out = {}
    def target():
        try: out['result'] = f(*args)
        except BaseException as e: out['result'] = e
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f'{f.__name__}{args} still running after {seconds} s'
    return out['result']

@pytest.fixture
def serve():
    "Start servers on 127.0.0.1 whose GET is `answer(handler, stop)`; returns a function giving a server's base URL."
    stop, servers = threading.Event(), []
    def start(answer):
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args): pass
            def do_GET(self):
                try: answer(self, stop)
                except OSError: pass  # the client gave up
        httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        threading.Thread(target=httpd.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True).start()
        servers.append(httpd)
        return f'http://127.0.0.1:{httpd.server_port}/'
    yield start
    stop.set()
    for httpd in servers: httpd.shutdown(); httpd.server_close()

def promise(handler, n):
    "Start an answer of `n` bytes."
    handler.send_response(200)
    handler.send_header('Content-Length', str(n))
    handler.end_headers()

@pytest.fixture
def trickle(serve):
    "A server that promises 1 MB and sends it one byte every 0.1 s, until the test ends."
    def answer(handler, stop):
        promise(handler, 10**6)
        while not stop.wait(0.1): handler.wfile.write(b'\x1f')
    return serve(answer) + 'trickle/'

@pytest.fixture
def silent():
    "The address of a socket on 127.0.0.1 that accepts connections but never answers."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        s.listen(16)
        yield f'http://127.0.0.1:{s.getsockname()[1]}/'

def test_trickling_mirror_hits_the_deadline(fake, server, trickle, monkeypatch):
    # bytes arrive every 0.1 s, well within the per-connection timeout: only the deadline can stop it
    monkeypatch.setattr(nb, 'DOWNLOAD_TIMEOUT', 2)
    monkeypatch.setattr(nb, 'DOWNLOAD_DEADLINE', 1.5)
    good = server.mirror('good')
    use_mirrors(monkeypatch, trickle, good)
    err = finishes_within(30, nb._download, 'mnist', LABELS)
    assert isinstance(err, DataUnavailableError), err
    msg = str(err)
    assert f'mnist/{LABELS}.gz' in msg and '1.5 s' in msg and 'DOWNLOAD_DEADLINE' in msg
    assert f'{trickle}{LABELS}.gz: ' in msg and f'{good}{LABELS}.gz: not tried' in msg
    assert server.requests == []  # the deadline is for all mirrors together
    assert not fake.exists() or not any(fake.iterdir())  # nothing half-downloaded in the cache

def test_silent_mirrors_share_one_deadline(fake, silent, monkeypatch):
    monkeypatch.setattr(nb, 'DOWNLOAD_TIMEOUT', 0.5)
    monkeypatch.setattr(nb, 'DOWNLOAD_DEADLINE', 1.2)
    mirrors = [f'{silent}m{i}/' for i in range(8)]  # 8 x 0.5 s = 4 s without a deadline
    use_mirrors(monkeypatch, *mirrors)
    err = finishes_within(30, nb._download, 'mnist', LABELS)
    assert isinstance(err, DataUnavailableError), err
    msg = str(err)
    assert '1.2 s' in msg and f'{mirrors[0]}{LABELS}.gz: ' in msg and f'{mirrors[-1]}{LABELS}.gz: not tried' in msg

def test_a_slow_but_steady_download_within_the_deadline_succeeds(fake, server, monkeypatch):
    monkeypatch.setattr(nb, '_CHUNK', 16)  # many chunks, each checked against the deadline
    use_mirrors(monkeypatch, server.mirror('good'))
    assert nb._download('mnist', IMAGES) == FAKE[IMAGES]

def test_connection_cut_short_falls_through(fake, server, serve, monkeypatch, capsys):
    def answer(handler, stop):  # promises a whole file, sends 10 bytes and hangs up
        promise(handler, 1000)
        handler.wfile.write(gzip.compress(FAKE[LABELS])[:10])
    cut = serve(answer)
    use_mirrors(monkeypatch, cut, server.mirror('good'))
    assert nb._download('mnist', LABELS) == FAKE[LABELS]
    assert 'failed: truncated gzip' in capsys.readouterr().out

def unwritable_by_permission(monkeypatch, cache):
    # Tests run as root here, and chmod does not stop root from writing: so the save fails as it
    # would for a user in a read-only cache, by raising the PermissionError the OS would raise.
    def refuse(raw, dest): raise PermissionError(13, 'Permission denied', str(dest.parent))
    monkeypatch.setattr(nb, '_save', refuse)

def unwritable_by_a_file(monkeypatch, cache):
    # A real OSError even for root: the cache folder's parent is a file, so no folder can be made in it.
    cache.parent.parent.mkdir(parents=True, exist_ok=True)
    cache.parent.write_bytes(b'not a folder')

@pytest.mark.parametrize('make_unwritable', [unwritable_by_permission, unwritable_by_a_file])
def test_unwritable_cache_keeps_the_download(fake, server, monkeypatch, make_unwritable):
    use_mirrors(monkeypatch, server.mirror('good'))
    make_unwritable(monkeypatch, fake)
    with pytest.warns(UserWarning, match=re.escape(str(fake)) + '(.|\n)*EXP_CACHE_DIR'):
        x_train, y_train, x_valid, y_valid = get_data()
    assert y_train.tolist() == [5, 0, 4, 1] and torch.equal(x_valid[0], FAKE_IMAGES[4].flatten().float()/255)
    assert len(server.requests) == 2

@pytest.mark.skipif(os.geteuid() == 0, reason='root can write into a read-only folder; see the other unwritable-cache tests')
def test_read_only_cache_folder(fake, server, monkeypatch):
    use_mirrors(monkeypatch, server.mirror('good'))
    fake.mkdir(parents=True)
    fake.chmod(0o555)
    try:
        with pytest.warns(UserWarning, match=re.escape(str(fake))):
            assert nb._download('mnist', LABELS) == FAKE[LABELS]
    finally: fake.chmod(0o755)

def test_corrupt_file_in_a_read_only_cache(fake, server, monkeypatch):
    use_mirrors(monkeypatch, server.mirror('good'))
    cached = write_gz(fake/f'{LABELS}.gz', b'garbage')
    before = cached.read_bytes()
    unwritable_by_permission(monkeypatch, fake)
    with pytest.warns(UserWarning) as record:
        assert nb._load('mnist', LABELS) == FAKE[LABELS]
    messages = [str(w.message) for w in record]
    assert len(messages) == 2 and 'checksum mismatch' in messages[0] and 'Could not save' in messages[1]
    assert cached.read_bytes() == before

def test_failed_save_leaves_the_old_file_whole(tmp_path, monkeypatch):
    dest = tmp_path/'cache'/'f.gz'
    dest.parent.mkdir()
    dest.write_bytes(b'old and good')
    def disk_full(src, dst): raise OSError(28, 'No space left on device')
    monkeypatch.setattr(os, 'replace', disk_full)
    with pytest.raises(OSError, match='No space'): nb._save(b'new', dest)
    assert dest.read_bytes() == b'old and good'
    assert [p.name for p in dest.parent.iterdir()] == ['f.gz']  # no temporary file left
    monkeypatch.undo()
    nb._save(b'new', dest)
    assert dest.read_bytes() == b'new' and [p.name for p in dest.parent.iterdir()] == ['f.gz']

# ---- a download is bounded: by the size of the file, read and decompressed

def peak_memory(f, *args):
    "(result or exception of `f(*args)`, the peak of Python's memory allocations while it ran, in bytes)."
    tracemalloc.start()
    try:
        try: result = f(*args)
        except Exception as e: result = e
        return result, tracemalloc.get_traced_memory()[1]
    finally: tracemalloc.stop()

def test_endless_mirror_is_cut_off_at_the_expected_size(fake, server, serve, monkeypatch, capsys):
    # 30 MB offered in 64 KB chunks (a hostile mirror would send 400 MB or more) for a file of 60 KB
    block, sent = b'\x1f' * (1 << 16), []
    def answer(handler, stop):
        promise(handler, 30 * 2**20)
        for _ in range(30 * 16):
            if stop.is_set(): break
            handler.wfile.write(block)
            sent.append(len(block))
    endless = serve(answer)
    good = server.mirror('good')
    use_mirrors(monkeypatch, endless, good)
    monkeypatch.setitem(nb.SIZES, LABELS, 60_008)
    data, peak = peak_memory(nb._download, 'mnist', LABELS)
    assert peak < 4 * 2**20, f'{peak:,} bytes of memory for a file of 60 KB'
    assert data == FAKE[LABELS]  # then the next mirror's good copy
    assert f'failed: more than {60_008 + 600 + 1024:,} bytes' in capsys.readouterr().out
    assert sum(sent) < 10 * 2**20  # the connection was dropped long before the 30 MB were sent

def test_gzip_bomb_is_not_inflated_past_the_expected_size(fake, server, monkeypatch, capsys):
    bomb = gzip.compress(bytes(30 * 2**20))  # 30 MB of zeros in 30 KB
    (server.root/'bomb').mkdir()
    (server.root/'bomb'/f'{LABELS}.gz').write_bytes(bomb)
    use_mirrors(monkeypatch, server.url + 'bomb/', server.mirror('good'))
    monkeypatch.setitem(nb.SIZES, LABELS, 60_008)
    data, peak = peak_memory(nb._download, 'mnist', LABELS)
    assert peak < 4 * 2**20, f'{peak:,} bytes of memory for a file of 60 KB'
    assert data == FAKE[LABELS]
    assert 'failed: decompresses to more than 60,008 bytes' in capsys.readouterr().out
    write_gz(fake/f'{LABELS}.gz', bytes(10**6))  # a bomb in the cache is refused the same way, then downloaded again
    with pytest.warns(UserWarning, match=re.escape(str(fake/f'{LABELS}.gz')) + ': decompresses to more than'):
        assert nb._load('mnist', LABELS) == FAKE[LABELS]
