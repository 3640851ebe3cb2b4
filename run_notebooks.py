#!/usr/bin/env python3
"""Run the whole sequence of notebooks headless, each in a fresh kernel, and save their outputs.

    python run_notebooks.py             # export exp/, run every notebook in nbs/, write them back in place
    python run_notebooks.py 06 07       # only these notebooks (by number prefix), in the sequence's order
    python run_notebooks.py --quick     # EXP_QUICK=1: a data subset and fewer epochs; writes to nbs/quick/
    python run_notebooks.py --threads 2 # each kernel's torch uses 2 intra-op threads

First `notebook2script.py --all` exports every notebook's `#export` cells into exp/. Then each
numbered notebook directly inside nbs/ runs, in name order, in a fresh `python3` kernel whose
working directory is nbs/ and whose `PYTHONPATH` starts with the project root (so `from exp.nb_00
import *` imports this checkout's exp/, whatever `pip install -e` points at). The sequence starts
with 00_data (data loading, test helpers, `quick_mode()`). A notebook runs only once the one before
it has succeeded.

Output. A notebook that succeeds is written with its outputs (atomically: a temporary file, then
`os.replace`, by notebook2script.write_atomic) in place, or under `--out DIR`. The first cell that
fails stops the run: it is reported with the notebook's name, the cell's number, its first lines
and the error, the exit code is 1, and the notebook, with the error output, is saved as
`<out>/failed/<name>.ipynb`, never over the good one (nbs/failed/ is git-ignored, and
notebook2script.py only reads nbs/ itself). A later success removes that copy. Cells tagged
`raises-exception` may raise, as in Jupyter's nbclient. Cells are numbered from 0 by their index in
the notebook's list of cells, markdown cells included, as the `# %% nbs/<name>.ipynb cell N` lines
of exp/ number them: "cell 14" is the same cell in both.

Quick mode (`--quick`) is for CI and a first look: the kernels get `EXP_QUICK=1` (notebooks ask
`quick_mode()` from exp.nb_00), which trains on a subset for fewer epochs; the whole sequence runs
in under 10 minutes on 2 CPU cores. It writes to nbs/quick/ unless `--out` is given, so the
committed notebooks keep their full-run outputs. A full run sets `EXP_QUICK=0` whatever the shell
says. Everything else in the environment passes through unchanged (`EXP_DATA_DIR` included: with
it set, the notebooks never download).

Threads (`--threads N`): the kernels get `OMP_NUM_THREADS`, `MKL_NUM_THREADS` and
`EXP_TORCH_THREADS` set to N, so torch in each kernel uses N intra-op threads. A quick run uses
one thread unless told otherwise: its batches are small, and on a shared 2-core machine two
threads that wait for each other made it many times slower (benchmarks/threads.py, README). A
full run without `--threads` passes these variables through as they are, and torch picks its
own default (one thread per core).

A cell may run `--timeout S` seconds (a fraction is rounded up to whole seconds: nbclient counts
in seconds).

Key results. A notebook states its key results by printing lines that start with `RESULT:`, e.g.

    print(f'RESULT: validation accuracy (CNN, 8 epochs, GeneralRelu) = {acc:.4f}')

The runner collects them from the cells' stdout and lists them in the summary at the end, with each
notebook's status and time.

Written notebooks are normalised so that a re-run changes only what the outputs change: no
execution timestamps in cell metadata, kernelspec `python3` and language_info reduced to its name,
no widget state (nor widget views, which cannot render without it), stream outputs merged as
Jupyter merges them, execution counts 1, 2, 3... from the fresh kernel.

Interrupting a run (Ctrl-C, or SIGTERM, handled the same way) stops the kernel at once and prints
the summary of what ran: each notebook ok (written), interrupted (left as it was, never half-written) or
not run.

Exit codes: 0 all ran, 1 a notebook (or the export) failed, 2 bad arguments or unknown notebook,
130 interrupted.
"""
import argparse
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from notebook2script import Interrupted, stop_signals_blocked, stop_signals_raise, write_atomic

PROG = "run_notebooks.py"
ROOT = Path(__file__).resolve().parent
NBS_DIR = ROOT / "nbs"
NUMBERED_RE = re.compile(r"(\d+[a-z]*)_.*\.ipynb")  # as notebook2script.py: number prefix, then _
RESULT_PREFIX = "RESULT:"
QUICK_THREADS = 1            # torch threads per kernel in a quick run (see Threads in the docstring)
DEFAULT_TIMEOUT = 3600       # seconds per cell
STARTUP_TIMEOUT = 120        # seconds for a kernel to start on a busy machine
KERNEL_NAME = "python3"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": KERNEL_NAME}
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
VOLATILE_CELL_METADATA = ("execution", "ExecuteTime")
KERNEL_ARGS = ["--IPKernelApp.log_level=ERROR"]  # no start-up chatter from the kernel in the log
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "EXP_TORCH_THREADS")
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad arguments or an unknown notebook: exit 2."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM; `runs` says what each notebook got to."""

    def __init__(self, runs, signame):
        super().__init__(signame)
        self.runs, self.signame = runs, signame


@dataclass
class CellFailure:
    """Where a notebook stopped and why."""
    cell: int | None     # index among all the notebook's cells, from 0; None: before any cell
    n_cells: int
    source: str
    ename: str
    evalue: str
    traceback: str = ""
    execution_count: int | None = None


@dataclass
class NotebookRun:
    """The outcome of one notebook: status is 'ok', 'failed', 'not run', 'running' or 'interrupted'."""
    path: Path
    status: str = "not run"
    seconds: float = 0.0
    results: list = field(default_factory=list)
    out_path: Path | None = None
    failure: CellFailure | None = None

    @property
    def name(self): return self.path.stem


# --- choosing the notebooks -----------------------------------------------------------------------

def prefix(path):
    """The number prefix of a numbered notebook ('05a' for 05a_foundations.ipynb), or None."""
    m = NUMBERED_RE.fullmatch(Path(path).name)
    return m.group(1) if m else None


def numbered_notebooks(nbs_dir):
    """Every numbered notebook directly inside `nbs_dir`, in name order (the sequence's order)."""
    nbs_dir = Path(nbs_dir)
    if not nbs_dir.is_dir(): raise UsageError(f"{nbs_dir}: no such directory")
    return sorted(p for p in nbs_dir.iterdir() if p.is_file() and prefix(p))


def select_notebooks(nbs_dir, wanted=()):
    """The notebooks of `nbs_dir` named in `wanted` (number prefixes, names or file names), in order.

    Nothing wanted means all of them. A name that matches no notebook raises UsageError."""
    nbs = numbered_notebooks(nbs_dir)
    if not wanted: return nbs
    keys = {p: {prefix(p), p.stem, p.name} for p in nbs}
    unknown = [w for w in wanted if not any(Path(w).name in k for k in keys.values())]
    if unknown:
        have = ", ".join(prefix(p) for p in nbs) or "none"
        raise UsageError(f"no notebook numbered {', '.join(map(repr, unknown))} in {nbs_dir} "
                         f"(have: {have})")
    return [p for p in nbs if any(Path(w).name in keys[p] for w in wanted)]


# --- notebooks in and out -------------------------------------------------------------------------

def read_notebook(path):
    """The notebook at `path` as an nbformat 4 node."""
    import nbformat
    return nbformat.read(str(path), as_version=4)


def normalize(nb):
    """Strip what changes from run to run but is not an output; returns `nb` (changed in place)."""
    meta = nb.metadata
    meta.pop("widgets", None)
    meta["kernelspec"] = dict(KERNELSPEC)
    meta["language_info"] = {"name": "python"}
    for cell in nb.cells:
        for key in VOLATILE_CELL_METADATA: cell.get("metadata", {}).pop(key, None)
        for out in cell.get("outputs", []):
            data = out.get("data")
            if data is not None: data.pop(WIDGET_MIME, None)
    return nb


def notebook_text(nb):
    """The notebook as the bytes Jupyter would save (nbformat's JSON, one trailing newline)."""
    import nbformat
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def write_notebook(nb, path):
    """Normalise `nb` and write it to `path` atomically (temporary file in the same folder + os.replace)."""
    write_atomic(path, notebook_text(normalize(nb)))


def collect_results(nb):
    """The text after `RESULT:` of every stdout line that starts with it, in cell order."""
    results = []
    for cell in nb.cells:
        text = "".join(o.get("text", "") for o in cell.get("outputs", [])
                       if o.get("output_type") == "stream" and o.get("name") == "stdout")
        for line in text.splitlines():
            if line.startswith(RESULT_PREFIX): results.append(line[len(RESULT_PREFIX):].strip())
    return results


# --- running --------------------------------------------------------------------------------------

def kernel_env(root, quick, threads=None):
    """The kernel's environment: ours, with EXP_QUICK set, `root` first on PYTHONPATH and, given
    `threads`, OMP_NUM_THREADS, MKL_NUM_THREADS and EXP_TORCH_THREADS set to it."""
    env = dict(os.environ)
    env["EXP_QUICK"] = "1" if quick else "0"
    if threads: env.update(dict.fromkeys(THREAD_VARS, str(threads)))
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # no debugger warning in the log
    return env


def first_line(source, width=60):
    """The cell's first line of code (skipping comment lines such as `#export`), shortened to `width`."""
    lines = [l.strip() for l in source.splitlines() if l.strip()]
    line = next((l for l in lines if not l.startswith("#")), lines[0] if lines else "")
    return line if len(line) <= width else line[:width - 3] + "..."


def error_traceback(cell):
    """The traceback of the cell's error output, without colour codes."""
    tb = [line for o in cell.outputs if o.get("output_type") == "error" for line in o.get("traceback", [])]
    return ANSI_RE.sub("", "\n".join(tb))


def execute(nb, cwd, env, timeout=DEFAULT_TIMEOUT, tag="", out=None):
    """Execute the code cells of `nb` in order in a fresh kernel; returns the CellFailure or None.

    Prints one line per code cell: `[tag] cell i  its first line  [1.2s]`, i counted from 0 among all
    the cells. A fractional `timeout` is rounded up to whole seconds."""
    out = out or sys.stdout
    timeout = math.ceil(timeout)
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    for cell in nb.cells:  # no stale outputs: a cell that does not run shows none
        if cell.cell_type == "code": cell.outputs, cell.execution_count = [], None
    client = NotebookClient(nb, timeout=timeout, startup_timeout=STARTUP_TIMEOUT,
                            kernel_name=KERNEL_NAME, record_timing=False, coalesce_streams=True,
                            resources={"metadata": {"path": str(cwd)}},
                            extra_arguments=KERNEL_ARGS)
    n, current = len(nb.cells), None
    try:
        with client.setup_kernel(env=env):
            for i, cell in enumerate(nb.cells):
                if cell.cell_type != "code" or not cell.source.strip(): continue
                current = i
                print(f"[{tag}] cell {i:>{len(str(n - 1))}}  {first_line(cell.source)}",
                      end="", file=out, flush=True)
                start = time.perf_counter()
                try:
                    client.execute_cell(cell, i)
                except KeyboardInterrupt:  # Ctrl-C or SIGTERM: kill the kernel, do not wait for the cell
                    client.shutdown_kernel = "immediate"
                    raise
                except CellExecutionError as e:
                    error = (e.ename, e.evalue, error_traceback(cell))
                except CellTimeoutError:
                    error = ("CellTimeoutError", f"the cell did not finish in {timeout} s (see --timeout)", "")
                except DeadKernelError as e:
                    error = ("DeadKernelError", f"the kernel died ({e}; out of memory?)", "")
                else:
                    print(f"  [{time.perf_counter() - start:.1f}s]", file=out, flush=True)
                    continue
                print("  [FAILED]", file=out, flush=True)
                return CellFailure(i, n, cell.source, *error, execution_count=cell.execution_count)
    except Exception as e:  # the kernel did not start, or the connection to it broke
        if current is None:
            return CellFailure(None, n, "", type(e).__name__, f"the {KERNEL_NAME} kernel did not start: {e}")
        print("  [FAILED]", file=out, flush=True)
        return CellFailure(current, n, nb.cells[current].source, type(e).__name__, str(e))
    return None


def run_notebook(run, out_path, failed_path, quick=False, timeout=DEFAULT_TIMEOUT,
                 root=None, out=None, threads=None):
    """Run the notebook of `run` (a NotebookRun, filled in and returned); write it to `out_path` if it
    succeeds, else to `failed_path`.

    Its status is 'running' until the notebook is written and the status set, which happen together
    (SIGINT and SIGTERM are held back meanwhile): an interrupt leaves it 'running', nothing written."""
    path = run.path
    root = Path(root) if root else path.parent.parent
    run.status, start = "running", time.perf_counter()
    try:
        nb = read_notebook(path)
    except Exception as e:  # with --no-export nothing has read it yet
        run.status, run.failure = "failed", CellFailure(None, 0, "", type(e).__name__, f"cannot read the notebook: {e}")
        return run
    try:
        failure = execute(nb, path.parent, kernel_env(root, quick, threads), timeout, prefix(path) or path.stem, out)
    finally:
        run.seconds = time.perf_counter() - start
    with stop_signals_blocked():
        run.failure, run.results = failure, collect_results(nb)
        run.out_path = Path(failed_path if failure else out_path)
        write_notebook(nb, run.out_path)
        if not failure and Path(failed_path).exists(): Path(failed_path).unlink()
        run.status = "failed" if failure else "ok"
    return run


def run_notebooks(paths, out_dir=None, quick=False, timeout=DEFAULT_TIMEOUT, root=None, out=None,
                  threads=None):
    """Run the notebooks `paths` in order, each once the one before succeeded; a NotebookRun each.

    Each is written to `out_dir` (default: in place), a failed one to `<out_dir>/failed/`. A
    KeyboardInterrupt (Ctrl-C; SIGTERM too under main()) stops the run and is raised again as
    RunInterrupted, whose `runs` mark the notebook that was running 'interrupted' (not written).
    A quick run uses QUICK_THREADS torch threads unless `threads` says otherwise."""
    out = out or sys.stdout
    if quick and threads is None: threads = QUICK_THREADS
    runs = [NotebookRun(Path(p)) for p in paths]
    try:
        for k, run in enumerate(runs):
            dest = Path(out_dir) if out_dir else run.path.parent
            print(f"== {run.path.name} ({k + 1}/{len(runs)}){' [quick]' if quick else ''}", file=out, flush=True)
            run_notebook(run, dest / run.path.name, dest / "failed" / run.path.name,
                         quick, timeout, root, out, threads)
            if run.failure:
                print(failure_report(run), file=out, flush=True)
                break
            print(f"== {run.path.name}: ok in {run.seconds:.1f}s, written to {shown(run.out_path)}", file=out, flush=True)
    except KeyboardInterrupt as e:
        for run in runs:
            if run.status == "running": run.status = "interrupted"
        raise RunInterrupted(runs, getattr(e, "signame", "SIGINT")) from e
    return runs


# --- reporting ------------------------------------------------------------------------------------

def shown(path):
    """`path` relative to the current directory when it is inside it."""
    try: return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError: return str(path)


def failure_report(run, n_lines=5, n_tb=20):
    """What failed, where: notebook, cell number, the cell's first lines, the error."""
    f = run.failure
    lines = f.source.splitlines()
    src = [f"    {l}".rstrip() for l in lines[:n_lines]] + (["    ..."] if len(lines) > n_lines else [])
    tb = [l for l in f.traceback.splitlines() if l.strip()][-n_tb:]
    count = f"; In [{f.execution_count}]" if f.execution_count else ""
    where = f"cell {f.cell} (counting from 0{count})" if f.cell is not None else "before any cell ran"
    saved = f"saved with the error output: {shown(run.out_path)}" if run.out_path else "nothing was written"
    return "\n".join([f"FAILED: {run.path.name}, {where}:", *src,
                      *([""] + [f"  {l}" for l in tb] + [""] if tb else []),
                      f"  {f.ename}: {f.evalue}",
                      f"  {saved}"])


def status_text(run):
    """A notebook's status as the summary shows it."""
    if run.failure: return f"FAILED at cell {run.failure.cell}" if run.failure.cell is not None else "FAILED"
    return "interrupted (left as it was)" if run.status == "interrupted" else run.status


def summary(runs, quick=False):
    """Each notebook's status and time, then the RESULT: lines each printed."""
    width = max([len(r.name) for r in runs] + [8])
    lines = [f"Summary{' (quick mode)' if quick else ''}:"]
    for r in runs:
        status = status_text(r)
        time_s = f"{r.seconds:7.1f}s" if r.status != "not run" else " " * 8
        lines.append(f"  {r.name:<{width}}  {time_s}  {status}")
    lines.append(f"  {'total':<{width}}  {sum(r.seconds for r in runs):7.1f}s")
    results = [(r, res) for r in runs for res in r.results]
    if results:
        lines.append("Results:")
        lines += [f"  [{prefix(r.path) or r.name}] {res}" for r, res in results]
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------------

class ArgParser(argparse.ArgumentParser):
    """Argument parser that reports usage errors as one line, exit code 2."""

    def error(self, message):
        self.exit(2, f"{PROG}: {message} (see --help)\n")


def seconds(text):
    """--timeout's type: a positive number of seconds (a fraction is rounded up later)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def thread_count(text):
    """--threads' type: a whole number, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1: raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv):
    p = ArgParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebooks", nargs="*", metavar="NOTEBOOK",
                   help="number prefixes (or names) of the notebooks to run, e.g. 06 07; default: all")
    p.add_argument("--quick", action="store_true",
                   help="EXP_QUICK=1: a data subset and fewer epochs (CI, a first look); writes to "
                        "nbs/quick/ unless --out is given")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write the executed notebooks to DIR (default: in place; nbs/quick/ with --quick)")
    p.add_argument("--timeout", type=seconds, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds a cell may run, > 0; a fraction is rounded up to whole seconds "
                        f"(default {DEFAULT_TIMEOUT})")
    p.add_argument("--threads", type=thread_count, metavar="N",
                   help="torch intra-op threads per kernel, >= 1: sets OMP_NUM_THREADS, MKL_NUM_THREADS and "
                        "EXP_TORCH_THREADS in the kernels (default: 1 with --quick, else torch's own default)")
    p.add_argument("--nbs", type=Path, default=NBS_DIR, metavar="DIR",
                   help="the notebooks' folder (default: nbs/ beside this script); the project root, "
                        "where notebook2script.py and exp/ are, is its parent")
    p.add_argument("--no-export", action="store_true",
                   help="do not run notebook2script.py --all first (exp/ is used as it is)")
    return p.parse_args(argv)


def export_all(root, out=None):
    """Run `notebook2script.py --all` of the project at `root`; True if it succeeded."""
    out = out or sys.stdout
    script = Path(root) / "notebook2script.py"
    if not script.is_file():
        print(f"{PROG}: {script}: no such file (pass --no-export to run without exporting)", file=sys.stderr)
        return False
    print(f"== exporting: python notebook2script.py --all", file=out, flush=True)
    proc = subprocess.Popen([sys.executable, str(script), "--all"], cwd=root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate()
    except BaseException:  # interrupted: SIGTERM lets the exporter leave exp/ all old or all new
        proc.terminate()
        proc.wait()
        raise
    print(output, end="", file=out, flush=True)
    if proc.returncode:
        print(f"{PROG}: notebook2script.py --all failed (exit {proc.returncode}); no notebook was run",
              file=sys.stderr)
    return proc.returncode == 0


def report_interrupt(runs, signame, quick, out):
    """Print the summary of a run stopped by `signame`; returns the exit code, 130."""
    print(f"\n{summary(runs, quick)}", file=out, flush=True)
    print(f"{PROG}: interrupted by {signame}; a notebook interrupted while running was not written",
          file=sys.stderr)
    return EXIT_INTERRUPTED


def main(argv=None, out=None):
    """Run the command line; return the exit code."""
    out = out or sys.stdout
    args = parse_args(argv)
    nbs_dir = args.nbs.resolve()
    root = nbs_dir.parent
    try:
        paths = select_notebooks(nbs_dir, args.notebooks)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    if not paths:
        print(f"{PROG}: no numbered notebooks in {nbs_dir}", file=sys.stderr)
        return 2
    out_dir = args.out or (nbs_dir / "quick" if args.quick else None)
    try:
        with stop_signals_raise():  # SIGTERM, like Ctrl-C, raises a KeyboardInterrupt
            if not args.no_export and not export_all(root, out): return 1
            runs = run_notebooks(paths, out_dir, args.quick, args.timeout, root, out, args.threads)
    except RunInterrupted as e:
        return report_interrupt(e.runs, e.signame, args.quick, out)
    except Interrupted as e:  # while exporting: no notebook ran
        return report_interrupt([NotebookRun(p) for p in paths], e.signame, args.quick, out)
    print(summary(runs, args.quick), file=out, flush=True)
    if out_dir: print(f"notebooks written to {shown(out_dir)}", file=out)
    return 1 if any(r.failure for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
