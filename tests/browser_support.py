"""JupyterLab on 127.0.0.1 and headless Chromium driven by Playwright, for tests/test_browser.py.

Every wait is bounded, and both the server (its whole process group, and the kernels it started,
which run in sessions of their own) and the browser are stopped when their context ends, whatever
happened inside it. `missing()` says why the browser test cannot run here, or None.
"""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-quic',
                 '--no-first-run', '--disable-background-networking', '--disable-component-update',
                 '--disable-sync', '--disable-default-apps', '--disable-extensions']

# JupyterLab settings for a quiet, offline session: no news, no update check, no widget state in files
# (JupyterLab's default: a saved notebook carries no widget state unless the user asks for it).
LAB_SETTINGS = {
    '@jupyterlab/apputils-extension/notification.jupyterlab-settings':
        {'fetchNews': 'false', 'checkForUpdates': False},
}


def chromium_path():
    """The Chromium to drive: $EXP_CHROMIUM, else Debian's /usr/bin/chromium, else one on the PATH."""
    for cand in (os.environ.get('EXP_CHROMIUM'), '/usr/bin/chromium'):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK): return cand
    return shutil.which('chromium') or shutil.which('chromium-browser')


def missing():
    """Why the browser test cannot run on this machine (a sentence), or None when it can."""
    if chromium_path() is None:
        return ("no Chromium: install Debian's package (apt-get install -y chromium) or set EXP_CHROMIUM "
                "to a Chromium executable")
    for module, pkg in (('playwright.sync_api', 'playwright'), ('jupyterlab', 'jupyterlab'),
                        ('ipywidgets', 'ipywidgets'), ('nbconvert', 'nbconvert')):
        try: __import__(module)
        except ImportError: return f'{pkg} is not installed: pip install -e ".[browser]"'
    return None


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_for(pred, timeout, what, interval=0.25):
    """Calls `pred()` until it returns something truthy (returned), for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        res = pred()
        if res: return res
        if time.monotonic() > deadline: raise TimeoutError(f'waited {timeout:.0f} s for {what}')
        time.sleep(interval)


def _children(pid):
    "The pids of the processes whose parent is `pid` (from /proc; empty where there is no /proc)."
    kids = []
    for d in Path('/proc').glob('[0-9]*'):
        try: stat = (d / 'stat').read_text()
        except OSError: continue
        if int(stat.rsplit(')', 1)[1].split()[1]) == pid: kids.append(int(d.name))
    return kids


def _kill_group(pid, timeout=10):
    "SIGTERM to the process group led by `pid`, SIGKILL to what is left after `timeout` seconds."
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 0)):
        try: os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError): return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try: os.killpg(pid, 0)
            except (ProcessLookupError, PermissionError): return
            time.sleep(0.1)


def _die_with_parent():
    "In the child, before exec: on Linux, SIGTERM when the test process dies, even by SIGKILL (no stray server)."
    if sys.platform.startswith('linux'):
        import ctypes
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # 1: PR_SET_PDEATHSIG


class JupyterLab:
    """`jupyter lab` serving `root` on 127.0.0.1 at a free port with a random token, in its own process
    group, with its own config, runtime, settings and workspace folders under `state_dir`.
    `env` is added to the server's environment, which its kernels inherit."""

    def __init__(self, root, state_dir, env=None, start_timeout=120):
        self.root, self.state_dir = Path(root), Path(state_dir)
        self.port, self.token = free_port(), uuid.uuid4().hex
        self.url = f'http://127.0.0.1:{self.port}'
        self.log_path = self.state_dir / 'jupyterlab.log'
        self.start_timeout, self.proc, self.kernel_pids = start_timeout, None, set()
        self.env = dict(os.environ, **(env or {}))
        for name, sub in (('JUPYTER_CONFIG_DIR', 'config'), ('JUPYTER_RUNTIME_DIR', 'runtime'),
                          ('JUPYTERLAB_SETTINGS_DIR', 'settings'), ('JUPYTERLAB_WORKSPACES_DIR', 'workspaces'),
                          ('IPYTHONDIR', 'ipython')):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
            self.env[name] = str(self.state_dir / sub)
        for rel, value in LAB_SETTINGS.items():
            p = self.state_dir / 'settings' / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(value))

    def __enter__(self):
        cmd = [sys.executable, '-m', 'jupyterlab', '--no-browser', '--ip=127.0.0.1', f'--port={self.port}',
               '--ServerApp.port_retries=0', f'--IdentityProvider.token={self.token}',
               f'--ServerApp.root_dir={self.root}', '--LabApp.expose_app_in_browser=True',
               '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate',
               '--LabApp.news_url=', '--ServerApp.terminals_enabled=False']
        if hasattr(os, 'geteuid') and os.geteuid() == 0: cmd.append('--allow-root')   # CI machines run as root
        self._log = open(self.log_path, 'wb')
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        try:
            wait_for(self._up, self.start_timeout, f'JupyterLab to answer at {self.url}', interval=0.5)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc): self.stop()

    def _up(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f'jupyter lab exited with {self.proc.returncode}:\n{self.log()}')
        try: return self.api('GET', '/api/status', timeout=5) is not None
        except (urllib.error.URLError, OSError): return False

    def log(self, tail=4000):
        try: return self.log_path.read_text(errors='replace')[-tail:]
        except OSError: return ''

    def api(self, method, path, body=None, timeout=30):
        "A call to the server's REST API; the decoded JSON answer (None when empty)."
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={'Authorization': f'token {self.token}',
                                              'Content-Type': 'application/json'})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read()
        return json.loads(text) if text else None

    def kernels(self):
        "The server's running kernels (and their pids are remembered, to be sure to stop them)."
        ks = self.api('GET', '/api/kernels')
        if self.proc is not None: self.kernel_pids.update(_children(self.proc.pid))
        return ks

    def kernels_idle(self, n=1):
        "True when `n` kernels run and all are idle."
        try: ks = self.kernels()
        except urllib.error.HTTPError: return False   # the list is briefly unavailable while a kernel starts or stops
        return len(ks) == n and all(k['execution_state'] == 'idle' for k in ks)

    def shutdown_kernels(self, timeout=30):
        for k in self.kernels(): self.api('DELETE', f"/api/kernels/{k['id']}", timeout=timeout)
        wait_for(lambda: not self.kernels(), timeout, 'the kernels to shut down')

    def stop(self):
        """Stops the server: its API's shutdown, then SIGTERM and SIGKILL to its process group and to
        the kernels' own groups. Safe to call twice."""
        if self.proc is None: return
        if self.proc.poll() is None:
            self.kernel_pids.update(_children(self.proc.pid))
            with contextlib.suppress(Exception): self.api('POST', '/api/shutdown', timeout=5)
            with contextlib.suppress(subprocess.TimeoutExpired): self.proc.wait(15)
        _kill_group(self.proc.pid)
        for pid in self.kernel_pids: _kill_group(pid, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired): self.proc.wait(10)
        self._log.close()
        self.proc = None


@contextlib.contextmanager
def chromium_page(user_data_dir, timeout_ms=60_000):
    """A page of a headless Chromium (the system's, never a downloaded one) with a fresh profile in
    `user_data_dir`; the browser and Playwright's driver are stopped on exit, whatever happened."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(user_data_dir), executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS,
            viewport={'width': 1400, 'height': 1000}, timeout=timeout_ms)
        try:
            ctx.set_default_timeout(timeout_ms)
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            yield page
        finally:
            with contextlib.suppress(Exception): ctx.close()
