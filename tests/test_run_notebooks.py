"""run_notebooks.py as a user meets it, on tiny notebooks in a throwaway project (real kernels, no data).

A kernel costs seconds: the few tests that start one run several notebooks each."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import run_notebooks as rn  # noqa: E402

pytest.importorskip("nbclient")


def write_nb(nbs, name, *cells, minor=4):
    "A notebook (format 4.4, as older tools wrote it): 'md:' cells are markdown, the others code ('!': may raise)."
    nb = new_notebook(cells=[new_markdown_cell(c[3:]) if c.startswith("md:") else new_code_cell(c.lstrip("!"), metadata={
        "tags": ["raises-exception"]} if c.startswith("!") else {}) for c in cells],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}})
    nb.nbformat_minor = minor
    for cell in nb.cells:
        if minor < 5:
            del cell["id"]
        if cell.cell_type == "code":  # outputs of an earlier run, which a run replaces
            cell.outputs, cell.execution_count = [nbformat.v4.new_output("stream", text="stale\n")], 7
    path = nbs / name
    path.write_text(json.dumps(nb, indent=1))
    return path


def stdout_of(path):
    "The stdout each code cell of a saved notebook printed."
    return ["".join(o.get("text", "") for o in c.outputs if o.get("name") == "stdout")
            for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


@pytest.fixture
def nbs(tmp_path):
    "nbs/ of an empty project."
    (tmp_path / "nbs").mkdir()
    return tmp_path / "nbs"


def run(nbs, *args):
    "rn.main on the project of `nbs`, without exporting."
    return rn.main(["--nbs", str(nbs), "--no-export", *args])


ENV = "import os, sys, pathlib\nprint(os.environ['EXP_QUICK'], os.environ.get('OMP_NUM_THREADS'), " \
      "os.environ.get('MKL_NUM_THREADS'), pathlib.Path.cwd().name, sys.path.index({root!r}) < sys.path.index({other!r}))"


def test_a_run_saves_each_notebook_stops_at_the_first_failing_cell_and_sums_up(nbs, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    root = str(nbs.parent)
    write_nb(nbs, "01_a.ipynb", "md:# A", ENV.format(root=root, other="/elsewhere"), "!1 / 0",
             "print('RESULT: accuracy = 0.9')\nprint('RESULT: loss = 0.1')")
    (nbs / "failed").mkdir()
    (nbs / "failed" / "01_a.ipynb").write_text("{}")  # from an earlier run that failed
    edited = write_nb(nbs, "02_edited.ipynb", "md:ORIGINAL",  # saved by the user while it runs
                      "import pathlib\np = pathlib.Path('02_edited.ipynb')\np.write_text(p.read_text().replace('ORIGINAL', 'EDITED'))")
    failing = write_nb(nbs, "03_fails.ipynb", "print('before')", "md:text", "def f(): return 1 / 0\nf()", "print('after')")
    later = write_nb(nbs, "04_later.ipynb", "print('later')")
    before = failing.read_bytes(), later.read_bytes()
    assert run(nbs) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("01_a.ipynb ... ok in ") and lines[0].endswith(f"s, saved as {nbs / '01_a.ipynb'}")
    assert stdout_of(nbs / "01_a.ipynb") == ["0 3 None nbs True\n", "", "RESULT: accuracy = 0.9\nRESULT: loss = 0.1\n"]
    assert not (nbs / "failed" / "01_a.ipynb").exists()
    assert lines[1].startswith("02_edited.ipynb ... ok in ") and lines[1].endswith(
        f"s, saved as {nbs / 'run-copies' / '02_edited.ipynb'} ({edited} changed on disk while it ran: your version is kept)")
    assert "EDITED" in edited.read_text() and stdout_of(edited) == ["stale\n"]
    assert stdout_of(nbs / "run-copies" / "02_edited.ipynb") == [""]
    assert lines[2] == "03_fails.ipynb ... failed"
    assert lines[3] == "FAILED: 03_fails.ipynb, cell 2: ZeroDivisionError: division by zero"
    assert "----> 2 f()" in out and "Traceback" not in out.split("FAILED")[0]
    assert lines[lines.index("Summary:") - 1] == f"  saved with the error output as {nbs / 'failed' / '03_fails.ipynb'}"
    assert (failing.read_bytes(), later.read_bytes()) == before  # never over the good one; 04 did not run
    nb = nbformat.read(nbs / "01_a.ipynb", as_version=4)  # counted from 1; the kernel's own language_info
    assert [c.execution_count for c in nb.cells if c.cell_type == "code"] == [1, 2, 3]
    assert (nb.nbformat_minor, nb.metadata.language_info.version) == (5, "%d.%d.%d" % sys.version_info[:3])
    assert {"codemirror_mode", "file_extension", "mimetype", "name", "pygments_lexer"} <= set(nb.metadata.language_info)
    saved = nbformat.read(nbs / "failed" / "03_fails.ipynb", as_version=4)
    assert [o.output_type for c in saved.cells if c.cell_type == "code" for o in c.outputs] == ["stream", "error"]
    summary = out[out.index("Summary:"):].splitlines()
    assert [row.split()[0] for row in summary[1:5]] == ["01_a", "02_edited", "03_fails", "04_later"]
    assert [row.split("s  ")[-1] for row in summary[1:5]] == ["ok", "ok", "FAILED at cell 2", "not run"]
    assert summary[5:] == ["Results:", "  [01] accuracy = 0.9", "  [01] loss = 0.1"]


def test_saved_notebooks_are_in_the_form_jupyterlab_saves(nbs):
    path = write_nb(nbs, "01_a.ipynb", "print(1)", "md:text", "print(2)")
    nb = nbformat.read(path, as_version=4)
    nb.metadata.widgets = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb.cells[0].metadata.update(execution={"iopub.status.busy": "2026-01-01"}, ExecuteTime={"end_time": "x"})
    nb.cells[0].outputs = [nbformat.v4.new_output("display_data", data={
        "text/plain": "bar", "application/vnd.jupyter.widget-view+json": {"model_id": "1"}})]
    nb.metadata.language_info = {"name": "python", "version": "3.0"}
    rn.save(nb, nbs / "out.ipynb")
    text = (nbs / "out.ipynb").read_text()
    saved = nbformat.reads(text, as_version=4)
    assert text == nbformat.writes(saved) + "\n" and text.endswith("}\n") and '\n "cells": [\n' in text
    assert (saved.nbformat, saved.nbformat_minor) == (4, 5) and all(len(c.id) >= 8 for c in saved.cells)
    assert saved.metadata == {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                                             "name": "python3"}, "language_info": {"name": "python", "version": "3.0"}}
    assert saved.cells[0].metadata == {} and saved.cells[0].outputs[0].data == {"text/plain": "bar"}
    ids = [c.id for c in saved.cells]
    rn.save(saved, nbs / "again.ipynb")
    assert (nbs / "again.ipynb").read_text() == text and [c.id for c in saved.cells] == ids


def test_a_quick_run_sets_one_torch_thread_saves_in_nbs_quick_and_a_timeout_is_one_line(nbs, capfd):
    root = str(nbs.parent)
    path = write_nb(nbs, "01_a.ipynb", ENV.format(root=root, other=root))
    slow = write_nb(nbs, "02_slow.ipynb", "md:text", "import time\ntime.sleep(60)")
    before = path.read_bytes(), slow.read_bytes()
    assert run(nbs, "--quick", "--timeout", "2.5", "01", "02_slow") == 1
    out, err = capfd.readouterr()
    assert stdout_of(nbs / "quick" / "01_a.ipynb") == ["1 1 1 nbs False\n"]
    assert "FAILED: 02_slow.ipynb, cell 1: timed out after 3 s (see --timeout)\n" in out
    assert "Traceback" not in out + err and "zmq" not in out + err
    assert (path.read_bytes(), slow.read_bytes()) == before and (nbs / "quick" / "failed" / "02_slow.ipynb").exists()
    assert "Summary (quick mode):" in out


def alive(pid):
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT to a process")
def test_ctrl_c_prints_the_summary_exits_130_and_stops_the_kernel(nbs):
    busy = write_nb(nbs, "02_busy.ipynb", "import os, time\nopen('busy.pid', 'w').write(str(os.getpid()))",
                    "time.sleep(120)")
    before = busy.read_bytes()
    child = subprocess.Popen([sys.executable, str(ROOT / "run_notebooks.py"), "--nbs", str(nbs), "--no-export"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (nbs / "busy.pid").exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 130, err
    summary = out[out.index("Summary:"):].splitlines()
    assert [row.split()[0::2] for row in summary[1:]] == [["02_busy", "interrupted"]]
    assert err == "run_notebooks.py: interrupted; the notebook that was running was not saved\n"
    assert busy.read_bytes() == before
    kernel, deadline = int((nbs / "busy.pid").read_text()), time.monotonic() + 20
    while alive(kernel) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(kernel), "the kernel was not shut down"


def test_notebooks_are_chosen_by_number_in_the_sequence_order(nbs, monkeypatch, capsys):
    for name in ["06_x.ipynb", "05b_x.ipynb", "05_x.ipynb", "05A_x.ipynb", "notes.ipynb"]:
        write_nb(nbs, name, "1")
    ran = []

    def run_notebook(run, dest, *args):
        ran.append(run.path.name)
        run.status, run.saved = "ok", dest
    monkeypatch.setattr(rn, "run_notebook", run_notebook)
    assert run(nbs, "06", "05a", "05_x.ipynb") == 0
    assert ran == ["05_x.ipynb", "05A_x.ipynb", "06_x.ipynb"]
    with pytest.raises(SystemExit) as exit:
        run(nbs, "07")
    assert exit.value.code == 2
    assert "no notebook 07 in " in capsys.readouterr().err and len(ran) == 3


@pytest.mark.parametrize("args", [["--out", "a_file"], ["--out", "a_file/sub"], ["--timeout", "0"], ["--threads", "0"], ["--timeout", "x"]])
def test_bad_arguments_are_refused_before_anything_runs(nbs, monkeypatch, args):
    write_nb(nbs, "01_a.ipynb", "1")
    (nbs.parent / "a_file").write_text("")
    monkeypatch.chdir(nbs.parent)
    monkeypatch.setattr(rn, "execute", lambda *a: pytest.fail("a notebook ran"))
    with pytest.raises(SystemExit) as exit:
        rn.main(["--nbs", str(nbs), *args])  # the export would run first: it does not
    assert exit.value.code == 2
    assert not (nbs.parent / "exp").exists()


WINDOWS = """import os, runpy, signal, sys
for module, names in [(signal, ['pthread_sigmask', 'pthread_kill', 'sigwait', 'SIG_BLOCK', 'SIG_UNBLOCK',
                                'SIG_SETMASK', 'SIGKILL', 'SIGHUP', 'SIGQUIT', 'SIGALRM', 'SIGUSR1', 'alarm', 'setitimer']),
                      (os, ['fork', 'forkpty', 'killpg', 'getpgid', 'setsid', 'register_at_fork'])]:
    for name in names:
        if hasattr(module, name): delattr(module, name)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_both_tools_work_without_the_unix_only_parts_of_signal_and_os(tmp_path):
    for tool in ["notebook2script.py", "run_notebooks.py", "nbtools.py"]:
        shutil.copy(ROOT / tool, tmp_path)
    (tmp_path / "nbs").mkdir()
    write_nb(tmp_path / "nbs", "01_a.ipynb", "#export\nx = 41", "from exp.nb_01 import x as y\nprint(y + 1)")

    def tool(*args):
        return subprocess.run([sys.executable, "-c", WINDOWS, *args], cwd=tmp_path, capture_output=True, text=True)
    ran = tool("run_notebooks.py", "--quick", "--timeout", "60")  # exports first
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "exported nbs/01_a.ipynb -> exp/nb_01.py\n" in ran.stdout
    assert stdout_of(tmp_path / "nbs" / "quick" / "01_a.ipynb") == ["", "42\n"]  # this project's exp/
    assert tool("notebook2script.py", "--check").stdout == "OK: 1 module(s) up to date\n"


def test_a_failed_export_runs_no_notebook(nbs, monkeypatch, capsys):
    write_nb(nbs, "01_a.ipynb", "1")
    (nbs.parent / "notebook2script.py").write_text("import sys; sys.exit(2)")
    monkeypatch.setattr(rn, "execute", lambda *a: pytest.fail("a notebook ran"))
    assert rn.main(["--nbs", str(nbs)]) == 1
    assert capsys.readouterr().err == "run_notebooks.py: the export failed; no notebook was run\n"


def test_a_notebook_that_cannot_be_read_is_a_reported_failure(nbs, capsys):
    (nbs / "01_a.ipynb").write_text("{not json")
    assert run(nbs) == 1
    out = capsys.readouterr().out
    assert "FAILED: 01_a.ipynb: cannot read the notebook: " in out and "FAILED" in out.split("Summary:")[1]


def test_a_relative_exp_data_dir_reaches_the_kernels_as_the_callers_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the kernels run in nbs/: 'data' there would be nbs/data
    monkeypatch.setenv("EXP_DATA_DIR", "data")
    assert rn.kernel_env(tmp_path, False, None)["EXP_DATA_DIR"] == str(tmp_path / "data")


@pytest.mark.skipif(os.name != "posix", reason="symbolic links need privileges on Windows")
def test_a_notebook_that_is_a_symbolic_link_is_written_through_the_link(nbs, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    real = write_nb(tmp_path / "elsewhere", "01_a.ipynb", "print('ran')")
    (nbs / "01_a.ipynb").symlink_to(real)
    assert run(nbs) == 0
    assert (nbs / "01_a.ipynb").is_symlink() and os.readlink(nbs / "01_a.ipynb") == str(real)
    assert stdout_of(real) == ["ran\n"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["01_a.ipynb"]  # no temporary file left


def test_a_cells_reply_is_awaited_in_short_polls_up_to_the_same_deadline():
    "jupyter/nbclient#312: one poll as long as the cell's timeout has slept on past a reply; short polls find it."
    import asyncio
    from queue import Empty
    from types import SimpleNamespace
    polls, reply_at = [], [4]

    class Shell:
        async def get_msg(self, timeout=None):
            polls.append(timeout)
            if len(polls) == reply_at[0]: return {"reply": "ok"}
            await asyncio.sleep(timeout)
            raise Empty

    kc = SimpleNamespace(shell_channel=Shell())
    rn.wait_for_replies_in_slices(kc, slice_s=0.01)
    assert asyncio.run(kc.shell_channel.get_msg(timeout=3600)) == {"reply": "ok"}
    assert len(polls) == 4 and max(polls) == 0.01          # not one poll of an hour
    polls.clear(); reply_at[0] = None                       # no reply: Empty once the cell's own timeout has passed
    start = time.monotonic()
    with pytest.raises(Empty): asyncio.run(kc.shell_channel.get_msg(timeout=0.05))
    assert time.monotonic() - start >= 0.045 and len(polls) >= 2 and max(polls) <= 0.01
