"""Tests of run_notebooks.py on tiny synthetic notebooks in a throwaway project (real kernels, no data)."""
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import run_notebooks as rn  # noqa: E402

pytest.importorskip("nbclient")


def code(source, tags=None, metadata=None):
    """A code cell (with stale outputs, which a run must replace)."""
    meta = dict(metadata or {}, **({"tags": tags} if tags else {}))
    return {"cell_type": "code", "execution_count": 99, "metadata": meta, "source": source,
            "outputs": [{"output_type": "stream", "name": "stdout", "text": "stale\n"}]}


def md(source):
    return {"cell_type": "markdown", "metadata": {}, "source": source}


def write_nb(nbs, name, *cells, metadata=None):
    """Write a notebook (nbformat 4.4, so cells need no ids) into `nbs` and return its path."""
    nb = {"cells": list(cells), "metadata": metadata or {}, "nbformat": 4, "nbformat_minor": 4}
    path = nbs / name
    path.write_text(json.dumps(nb, indent=1), encoding="utf-8")
    return path


def outputs_text(path):
    """All stream text of a written notebook, cell by cell."""
    nb = nbformat.read(str(path), as_version=4)
    return ["".join(o.get("text", "") for o in c.get("outputs", []) if o["output_type"] == "stream")
            for c in nb.cells if c.cell_type == "code"]


@pytest.fixture
def proj(tmp_path):
    """A project with an nbs/ folder and no exp/."""
    (tmp_path / "proj" / "nbs").mkdir(parents=True)
    return tmp_path / "proj"


def run_cli(proj, *args, export=False, capsys=None):
    argv = ["--nbs", str(proj / "nbs"), "--timeout", "60", *args] + ([] if export else ["--no-export"])
    return rn.main(argv)


# --- choosing notebooks ---------------------------------------------------------------------------

def test_select_by_prefix_in_sequence_order(proj):
    nbs = proj / "nbs"
    for name in ["05_a.ipynb", "05a_b.ipynb", "06_c.ipynb", "07_d.ipynb", "notes.ipynb", "07_d.py"]:
        (nbs / name).write_text("{}")
    (nbs / "quick").mkdir(); (nbs / "quick" / "08_e.ipynb").write_text("{}")
    names = lambda ps: [p.name for p in ps]
    assert names(rn.select_notebooks(nbs)) == ["05_a.ipynb", "05a_b.ipynb", "06_c.ipynb", "07_d.ipynb"]
    assert names(rn.select_notebooks(nbs, ["07", "05"])) == ["05_a.ipynb", "07_d.ipynb"]  # '05' is not '05a'
    assert names(rn.select_notebooks(nbs, ["05a_b", "nbs/06_c.ipynb"])) == ["05a_b.ipynb", "06_c.ipynb"]
    with pytest.raises(rn.UsageError, match=r"'08'.*have: 05, 05a, 06, 07"):
        rn.select_notebooks(nbs, ["06", "08"])


def test_unknown_prefix_exits_2_and_runs_nothing(proj, capsys):
    path = write_nb(proj / "nbs", "01_a.ipynb", code("print('ran')"))
    before = path.read_bytes()
    assert run_cli(proj, "02") == 2
    captured = capsys.readouterr()
    assert "no notebook numbered '02'" in captured.err and "have: 01" in captured.err
    assert path.read_bytes() == before and "ran" not in captured.out


def test_bad_arguments_exit_2(proj):
    with pytest.raises(SystemExit) as e: rn.main(["--nbs", str(proj / "nbs"), "--timeout", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e: rn.main(["--nbs", str(proj / "missing"), "--no-export", "--bogus"])
    assert e.value.code == 2
    assert rn.main(["--nbs", str(proj / "missing"), "--no-export"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--timeout", "0"], "argument --timeout: must be a positive number of seconds, got 0"),
    (["--timeout", "-1.5"], "argument --timeout: must be a positive number of seconds, got -1.5"),
    (["--timeout", "nan"], "argument --timeout: must be a positive number of seconds, got nan"),
    (["--timeout", "soon"], "argument --timeout: not a number of seconds: 'soon'"),
    (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    (["--threads", "-2"], "argument --threads: must be at least 1, got -2"),
    (["--threads", "1.5"], "argument --threads: not a whole number: '1.5'"),
])
def test_bad_timeout_or_threads_is_a_one_line_error_exit_2(proj, capsys, args, message):
    write_nb(proj / "nbs", "01_a.ipynb", code("open('ran', 'w')"))
    with pytest.raises(SystemExit) as e: rn.main(["--nbs", str(proj / "nbs"), "--no-export", *args])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"run_notebooks.py: {message} (see --help)\n"
    assert not (proj / "nbs" / "ran").exists()


def test_help_describes_timeout_and_threads(capsys):
    with pytest.raises(SystemExit) as e: rn.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "a fraction is rounded up to whole seconds" in text
    assert ("--threads N torch intra-op threads per kernel, >= 1: sets OMP_NUM_THREADS, MKL_NUM_THREADS "
            "and EXP_TORCH_THREADS in the kernels (default: 1 with --quick, else torch's own default)") in text


# --- running --------------------------------------------------------------------------------------

def test_success_runs_in_order_in_place_with_outputs(proj, capsys):
    nbs = proj / "nbs"
    # each notebook appends its number to a file in its working directory, which must be nbs/
    write_nb(nbs, "01_first.ipynb", md("# One"),
             code("open('order.txt', 'a').write('01 ')\nx = 6 * 7\nprint(x)"), code(""),
             code("x + 1"))
    write_nb(nbs, "02_second.ipynb", code("open('order.txt', 'a').write('02 ')\nprint('second')"))
    assert run_cli(proj) == 0
    assert (nbs / "order.txt").read_text() == "01 02 "
    assert outputs_text(nbs / "01_first.ipynb") == ["42\n", "", ""]
    nb = nbformat.read(str(nbs / "01_first.ipynb"), as_version=4)
    codes = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in codes] == [1, None, 2]  # fresh kernel; the empty cell is not run
    assert codes[2].outputs[0]["data"]["text/plain"] == "43"
    assert outputs_text(nbs / "02_second.ipynb") == ["second\n"]
    out = capsys.readouterr().out
    assert "[01] cell 1  open('order.txt', 'a').write('01 ')" in out and "[01] cell 3  x + 1" in out
    assert "01_first" in out.split("Summary:")[1] and "ok" in out.split("Summary:")[1]
    assert not list(nbs.glob(".*")) and not (nbs / "failed").exists()  # no temp files left


def test_failing_cell_stops_the_run_and_keeps_the_good_notebook(proj, capsys):
    nbs = proj / "nbs"
    write_nb(nbs, "01_ok.ipynb", code("print('fine')"))
    bad = write_nb(nbs, "02_bad.ipynb", md("text"), code("y = 1"),
                   code("# the failing cell\nz = y / 0\nprint('never')"), code("print('after')"))
    after = write_nb(nbs, "03_after.ipynb", code("open('ran03', 'w')"))
    bad_before, after_before = bad.read_bytes(), after.read_bytes()
    assert run_cli(proj) == 1
    out = capsys.readouterr().out
    report = out[out.index("FAILED: 02_bad.ipynb"):]
    assert "FAILED: 02_bad.ipynb, cell 2 (counting from 0; In [2]):" in report
    assert "    # the failing cell\n    z = y / 0" in report
    assert "ZeroDivisionError: division by zero" in report
    assert "failed/02_bad.ipynb" in report
    assert bad.read_bytes() == bad_before and after.read_bytes() == after_before  # untouched
    assert not (nbs / "ran03").exists()  # the run stopped
    summary = out.split("Summary:")[1]
    assert "FAILED at cell 2" in summary and "03_after" in summary and "not run" in summary
    failed = nbformat.read(str(nbs / "failed" / "02_bad.ipynb"), as_version=4)
    errors = [o for c in failed.cells if c.cell_type == "code" for o in c.outputs if o["output_type"] == "error"]
    assert [(e["ename"], e["evalue"]) for e in errors] == [("ZeroDivisionError", "division by zero")]
    assert failed.cells[3].outputs == [] and failed.cells[3].execution_count is None  # not run: no stale output
    assert outputs_text(nbs / "01_ok.ipynb") == ["fine\n"]
    # once the notebook is fixed, a run writes it and removes the failed copy
    write_nb(nbs, "02_bad.ipynb", code("print('fixed')"))
    assert run_cli(proj, "02") == 0
    assert outputs_text(nbs / "02_bad.ipynb") == ["fixed\n"] and not (nbs / "failed" / "02_bad.ipynb").exists()


def test_fractional_timeout_is_rounded_up_to_whole_seconds(proj, capsys):
    write_nb(proj / "nbs", "01_slow.ipynb", code("import time\ntime.sleep(30)"))
    start = time.perf_counter()
    assert rn.main(["--nbs", str(proj / "nbs"), "--no-export", "--timeout", "1.5"]) == 1
    assert time.perf_counter() - start < 25
    out = capsys.readouterr().out
    assert "FAILED: 01_slow.ipynb, cell 0 (counting from 0" in out
    assert "CellTimeoutError: the cell did not finish in 2 s (see --timeout)" in out


def test_failure_report_numbers_cells_as_the_exporter_does(proj, capsys):
    """The failing cell's number in the report is the one exp/'s '# %%' lines give it."""
    shutil.copy(ROOT / "notebook2script.py", proj / "notebook2script.py")
    write_nb(proj / "nbs", "01_lib.ipynb", md("# Lib"),
             code("#export\ndef boom():\n    raise RuntimeError('boom')"), md("Now call it:"),
             code("from exp.nb_01 import boom\nboom()"))
    assert run_cli(proj, export=True) == 1
    out = capsys.readouterr().out
    assert "FAILED: 01_lib.ipynb, cell 3 (counting from 0; In [2]):" in out
    assert "RuntimeError: boom" in out.split("FAILED:")[1]
    lines = (proj / "exp" / "nb_01.py").read_text().splitlines()
    lineno = int(re.findall(r"nb_01\.py:(\d+)", out)[-1])  # the traceback's line in exp/nb_01.py
    assert lines[lineno - 1] == "    raise RuntimeError('boom')"
    assert [l for l in lines[:lineno] if l.startswith("# %% ")][-1] == "# %% nbs/01_lib.ipynb cell 1"


PRINT_THREADS = ("import os, torch\n"
                 "print(torch.get_num_threads(), *(os.environ.get(v) for v in "
                 "('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'EXP_TORCH_THREADS')))")


def test_threads_set_torch_threads_in_the_kernels(proj, monkeypatch):
    """--threads 1 (torch takes OMP_NUM_THREADS up to the number of cores, so 1 works anywhere)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "EXP_TORCH_THREADS"): monkeypatch.delenv(var, raising=False)
    src = write_nb(proj / "nbs", "01_t.ipynb", code(PRINT_THREADS))
    assert run_cli(proj, "--threads", "1") == 0
    assert outputs_text(src) == ["1 1 1 1\n"]
    assert rn.kernel_env(proj, False, 12)["EXP_TORCH_THREADS"] == "12"


def test_without_threads_the_thread_variables_pass_through(proj, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for var in ("MKL_NUM_THREADS", "EXP_TORCH_THREADS"): monkeypatch.delenv(var, raising=False)
    src = write_nb(proj / "nbs", "01_t.ipynb", code(PRINT_THREADS))
    assert run_cli(proj) == 0
    assert outputs_text(src) == ["1 1 None None\n"]


def alive(pid):
    """Whether process `pid` exists and is not a zombie."""
    try: stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError: return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(condition, seconds):
    """Poll `condition` until it is true or `seconds` pass; its last value."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline: time.sleep(0.1)
    return condition()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_prints_the_summary_and_exits_130(proj, sig):
    nbs = proj / "nbs"
    write_nb(nbs, "01_done.ipynb", code("print('one')"))
    busy = write_nb(nbs, "02_busy.ipynb", md("busy"),
                    code("import os, time\nopen('busy.pid', 'w').write(str(os.getpid()))"),
                    code("time.sleep(120)"))
    later = write_nb(nbs, "03_later.ipynb", code("open('ran03', 'w')"))
    busy_before, later_before = busy.read_bytes(), later.read_bytes()
    child = subprocess.Popen([sys.executable, str(ROOT / "run_notebooks.py"), "--nbs", str(nbs), "--no-export"],
                             cwd=proj, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: (nbs / "busy.pid").exists() or child.poll() is not None, 120)
        time.sleep(1)  # the sleeping cell runs
        assert child.poll() is None
        child.send_signal(sig)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None: child.kill(); child.wait()
    assert child.returncode == 130, err
    rows = [line.split(None, 2) for line in out.split("Summary:")[1].splitlines()[1:4]]
    assert [(r[0], r[-1]) for r in rows] == [
        ("01_done", "ok"), ("02_busy", "interrupted (left as it was)"), ("03_later", "run")]
    assert rows[2] == ["03_later", "not", "run"] and float(rows[1][1].rstrip("s")) >= 1
    assert err.splitlines()[-1] == (f"run_notebooks.py: interrupted by {sig.name}; "
                                    "a notebook interrupted while running was not written")
    assert "Traceback" not in err
    assert outputs_text(nbs / "01_done.ipynb") == ["one\n"]
    assert busy.read_bytes() == busy_before and later.read_bytes() == later_before
    assert not (nbs / "ran03").exists() and not (nbs / "failed").exists()
    assert not list(nbs.glob(".*"))  # no temporary file
    kernel = int((nbs / "busy.pid").read_text())
    assert wait_for(lambda: not alive(kernel), 20), "the kernel was not shut down"


def test_cell_tagged_raises_exception_may_raise(proj):
    nbs = proj / "nbs"
    write_nb(nbs, "01_x.ipynb", code("raise ValueError('shown on purpose')", tags=["raises-exception"]),
             code("print('went on')"))
    assert run_cli(proj) == 0
    assert outputs_text(nbs / "01_x.ipynb")[1] == "went on\n"


def test_timeout_fails_the_cell(proj, capsys):
    write_nb(proj / "nbs", "01_slow.ipynb", code("import time\ntime.sleep(30)"))
    assert rn.main(["--nbs", str(proj / "nbs"), "--no-export", "--timeout", "2"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: 01_slow.ipynb, cell 0 (counting from 0" in out
    assert "CellTimeoutError: the cell did not finish in 2 s (see --timeout)" in out


def test_results_are_collected_into_the_summary(proj, capsys):
    nbs = proj / "nbs"
    write_nb(nbs, "01_a.ipynb", code("print('RESULT: accuracy (MLP) = 0.9500')\nprint('not a RESULT: line')"),
             code("for i in range(2): print(f'RESULT: run {i} = {i}')"))
    write_nb(nbs, "02_b.ipynb", code("import sys\nprint('RESULT: on stderr', file=sys.stderr)"),
             code("print('RESULT:   loss = 0.1  ')"))
    assert run_cli(proj) == 0
    results = capsys.readouterr().out.split("Results:")[1].splitlines()
    assert [l.strip() for l in results if l.strip()] == [
        "[01] accuracy (MLP) = 0.9500", "[01] run 0 = 0", "[01] run 1 = 1", "[02] loss = 0.1"]


def test_collect_results_joins_stream_chunks():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("")])
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="RESULT: a = "),
                           nbformat.v4.new_output("stream", name="stdout", text="1\nRESULT: b = 2\n")]
    assert rn.collect_results(nb) == ["a = 1", "b = 2"]


VOLATILE_META = {
    "kernelspec": {"display_name": "Some Env", "language": "python", "name": "myenv"},
    "language_info": {"name": "python", "version": "3.0.1", "mimetype": "text/x-python"},
    "widgets": {"application/vnd.jupyter.widget-state+json": {"state": {"abc": {}}}},
    "title": "kept",
}


def test_written_notebooks_carry_no_volatile_metadata_and_rerun_to_the_same_bytes(proj, tmp_path):
    nbs = proj / "nbs"
    src = write_nb(nbs, "01_a.ipynb",
                   code("print('hello')", metadata={"execution": {"iopub.status.busy": "2024-01-01T00:00:00Z"},
                                                    "ExecuteTime": {"end_time": "x"}, "tags": ["keep"]}),
                   code("import time\ntime.sleep(0.01)\n{'a': 1}"),
                   code("from IPython.display import display\n"
                        "display({'application/vnd.jupyter.widget-view+json': {'model_id': 'abc', "
                        "'version_major': 2, 'version_minor': 0}, 'text/plain': 'widget'}, raw=True)"),
                   metadata=VOLATILE_META)
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    assert run_cli(proj, "--out", str(out1)) == 0
    assert run_cli(proj, "--out", str(out2)) == 0
    first = (out1 / "01_a.ipynb").read_bytes()
    assert first == (out2 / "01_a.ipynb").read_bytes()  # deterministic outputs -> identical bytes
    nb = json.loads(first)
    assert nb["metadata"] == {"kernelspec": {"display_name": "Python 3", "language": "python",
                                             "name": "python3"},
                              "language_info": {"name": "python"}, "title": "kept"}
    assert [c["metadata"] for c in nb["cells"]] == [{"tags": ["keep"]}, {}, {}]
    assert [c["execution_count"] for c in nb["cells"]] == [1, 2, 3]
    assert nb["cells"][2]["outputs"][0]["data"] == {"text/plain": ["widget"]}
    assert first.endswith(b"}\n") and b'"execution"' not in first
    # in place, a second run does not change a byte either
    assert run_cli(proj) == 0
    in_place = src.read_bytes()
    assert run_cli(proj) == 0
    assert src.read_bytes() == in_place == first


def test_write_notebook_is_atomic(proj, monkeypatch):
    """A write that fails half way leaves the old file whole and no temporary file behind."""
    path = write_nb(proj / "nbs", "01_a.ipynb", code("1"))
    before = path.read_bytes()
    nb = nbformat.read(str(path), as_version=4)

    def broken_replace(src, dst): raise OSError("disk full")
    monkeypatch.setattr(rn.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"): rn.write_notebook(nb, path)
    assert path.read_bytes() == before and [p.name for p in (proj / "nbs").iterdir()] == ["01_a.ipynb"]


PRINT_QUICK = "import os\nprint('EXP_QUICK=' + os.environ['EXP_QUICK'])"


def test_quick_mode_sets_exp_quick_and_writes_to_nbs_quick(proj, capsys, monkeypatch):
    monkeypatch.setenv("EXP_QUICK", "1")  # a full run ignores the shell's EXP_QUICK
    nbs = proj / "nbs"
    src = write_nb(nbs, "01_a.ipynb", code(PRINT_QUICK))
    before = src.read_bytes()
    assert run_cli(proj, "--quick") == 0
    assert src.read_bytes() == before  # the committed notebook keeps its outputs
    assert outputs_text(nbs / "quick" / "01_a.ipynb") == ["EXP_QUICK=1\n"]
    assert "Summary (quick mode):" in capsys.readouterr().out
    assert run_cli(proj) == 0
    assert outputs_text(src) == ["EXP_QUICK=0\n"]


def test_quick_mode_with_out_dir(proj, tmp_path):
    nbs = proj / "nbs"
    write_nb(nbs, "01_a.ipynb", code(PRINT_QUICK))
    runs = rn.run_notebooks(rn.select_notebooks(nbs), out_dir=tmp_path / "out", quick=True, timeout=60)
    assert [(r.name, r.status) for r in runs] == [("01_a", "ok")]
    assert runs[0].out_path == tmp_path / "out" / "01_a.ipynb" and runs[0].seconds > 0
    assert outputs_text(tmp_path / "out" / "01_a.ipynb") == ["EXP_QUICK=1\n"]
    assert not (nbs / "quick").exists()


def test_exports_first_and_kernels_import_this_projects_exp(proj, capsys):
    """The kernel's PYTHONPATH starts with the project root, so it imports the exp/ just exported."""
    shutil.copy(ROOT / "notebook2script.py", proj / "notebook2script.py")
    nbs = proj / "nbs"
    write_nb(nbs, "01_lib.ipynb", code("#export\ndef answer(): return 42"))
    write_nb(nbs, "02_use.ipynb", code("import exp\nfrom exp.nb_01 import answer\n"
                                       "print(answer(), exp.__file__)"))
    assert run_cli(proj, export=True) == 0
    assert (proj / "exp" / "nb_01.py").is_file()
    text = outputs_text(nbs / "02_use.ipynb")[0]
    assert text.startswith("42 ") and str(proj / "exp") in text


def test_export_failure_stops_before_running(proj, capsys):
    shutil.copy(ROOT / "notebook2script.py", proj / "notebook2script.py")
    nbs = proj / "nbs"
    good = write_nb(nbs, "01_a.ipynb", code("open('ran', 'w')"))
    (nbs / "02_broken.ipynb").write_text("{not json")
    assert run_cli(proj, export=True) == 1
    assert "notebook2script.py --all failed" in capsys.readouterr().err
    assert not (nbs / "ran").exists() and "outputs" in good.read_text()


def test_failure_report_shows_the_first_lines():
    run = rn.NotebookRun(Path("nbs/06_x.ipynb"), status="failed", out_path=Path("/x/failed/06_x.ipynb"),
                         failure=rn.CellFailure(12, 40, "\n".join(f"line{i}" for i in range(9)),
                                                "KeyError", "'k'", execution_count=7))
    report = rn.failure_report(run)
    assert report.splitlines()[0] == "FAILED: 06_x.ipynb, cell 12 (counting from 0; In [7]):"
    assert "    line4\n    ..." in report and "line5" not in report and "  KeyError: 'k'" in report


def test_unreadable_notebook_is_a_reported_failure(proj, capsys):
    nbs = proj / "nbs"
    write_nb(nbs, "01_a.ipynb", code("print('fine')"))
    (nbs / "02_broken.ipynb").write_text("{not json")
    assert run_cli(proj) == 1
    out = capsys.readouterr().out
    assert "FAILED: 02_broken.ipynb, before any cell ran:" in out and "cannot read the notebook" in out
    assert "nothing was written" in out and (nbs / "02_broken.ipynb").read_text() == "{not json"
    assert not (nbs / "failed").exists()


def test_kernel_that_does_not_start_is_a_reported_failure(proj, capsys, monkeypatch):
    write_nb(proj / "nbs", "01_a.ipynb", code("print('fine')"))
    monkeypatch.setattr(rn, "KERNEL_NAME", "no-such-kernel")
    assert run_cli(proj) == 1
    out = capsys.readouterr().out
    assert "FAILED: 01_a.ipynb, before any cell ran:" in out and "no-such-kernel kernel did not start" in out
    assert (proj / "nbs" / "failed" / "01_a.ipynb").is_file()


def test_a_quick_run_uses_one_thread_unless_told_otherwise(proj, monkeypatch):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "EXP_TORCH_THREADS"): monkeypatch.delenv(var, raising=False)
    write_nb(proj / "nbs", "01_t.ipynb", code(PRINT_THREADS))
    assert run_cli(proj, "--quick") == 0
    assert outputs_text(proj / "nbs" / "quick" / "01_t.ipynb") == ["1 1 1 1\n"]
    env = rn.kernel_env(proj, True, 2)
    assert env["EXP_TORCH_THREADS"] == "2" and rn.QUICK_THREADS == 1
