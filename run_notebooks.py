#!/usr/bin/env python3
"""Run the numbered notebooks of nbs/, each in a fresh kernel, and save them with their outputs.

    python run_notebooks.py            # export exp/, then run every notebook and save it in place
    python run_notebooks.py 06 07      # only these notebooks, by number
    python run_notebooks.py --quick    # EXP_QUICK=1: less data, fewer epochs; saves to nbs/quick/

Each notebook runs in a new python3 kernel started in nbs/, with the project root first on
PYTHONPATH. The first cell that fails stops the run; that notebook is saved in <out>/failed/, never
over the good one. The lines the notebooks print starting with `RESULT:` end up in the summary.
Exit status: 0 all ran, 1 a notebook or the export failed, 2 bad arguments, 130 Ctrl-C.
"""
import argparse, math, os, re, signal, subprocess, sys, time
from pathlib import Path
from queue import Empty

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

from nbtools import NBS, number, numbered_notebooks, write_atomic

NBS_DIR = NBS
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colours in the kernel's tracebacks


class Run:
    "One notebook's run; status: 'not run', 'running', 'ok', 'failed' or 'interrupted'."
    def __init__(self, path):
        self.path, self.name, self.status, self.seconds, self.results = Path(path), Path(path).stem, "not run", 0.0, []
        self.cell = self.failure = self.saved = None  # where it failed, why, where it was saved
        self.note = ""


def kernel_env(root, quick, threads):
    "The kernel's environment: ours, with EXP_QUICK, the project first on PYTHONPATH and the torch threads."
    env = dict(os.environ, EXP_QUICK="1" if quick else "0")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(root), env.get("PYTHONPATH")] if p)
    if env.get("EXP_DATA_DIR"):  # the kernels run in nbs/: a relative folder is the caller's
        env["EXP_DATA_DIR"] = os.path.abspath(env["EXP_DATA_DIR"])
    return env


def wait_for_replies_in_slices(kc, slice_s=1.0):
    """Makes the kernel client wait for each shell reply in polls of at most `slice_s` seconds, up to the same
    deadline. nbclient waits for a cell's reply with one poll as long as the cell's timeout (an hour here). That
    poll has been seen to sleep on while the kernel sat idle, its reply sent (jupyter/nbclient#312); a fresh poll
    finds a reply that is waiting."""
    channel = kc.shell_channel
    poll_once = channel.get_msg

    async def get_msg(timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await poll_once(timeout=slice_s if left is None else min(slice_s, left))
            except Empty:
                if left is not None and left <= slice_s:
                    raise
    channel.get_msg = get_msg


def execute(nb, cwd, env, timeout):
    "Run the notebook's cells in a fresh kernel, in order; None if all ran, else (cell index, error)."
    for cell in nb.cells:  # no outputs left from an earlier run
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(nb, timeout=math.ceil(timeout), kernel_name="python3", record_timing=False,
                            coalesce_streams=True, resources={"metadata": {"path": str(cwd)}})
    index = None
    try:  # the kernel's own log (a zmq traceback after a timeout) is not ours to show: stderr goes nowhere
        with client.setup_kernel(env=env, stderr=subprocess.DEVNULL):
            wait_for_replies_in_slices(client.kc)
            reply = client.wait_for_reply(client.kc.kernel_info())
            nb.metadata.language_info = reply["content"]["language_info"]
            for index, cell in enumerate(nb.cells):
                try:
                    client.execute_cell(cell, index, execution_count=client.code_cells_executed + 1)
                except KeyboardInterrupt:
                    client.shutdown_kernel = "immediate"  # do not wait for the cell
                    raise
    except CellExecutionError as e:
        tb = ANSI.sub("", "\n".join(line for out in nb.cells[index].outputs for line in out.get("traceback", [])))
        tb = [line for line in tb.split("\n") if line.strip("- ")]  # without colours and rules
        return index, "\n".join(tb[-20:] or [f"{e.ename}: {e.evalue}"])
    except CellTimeoutError:
        return index, f"timed out after {math.ceil(timeout)} s (see --timeout)"
    except DeadKernelError:
        return index, "the kernel died (out of memory?)"
    except Exception as e:  # the kernel did not start, or the connection to it broke
        return index, f"{type(e).__name__}: {e}"
    return None


def save(nb, path):
    "Write the notebook as JupyterLab 4 saves it, so that opening and closing it changes nothing."
    if nb.nbformat_minor < 5:
        nbformat.v4.upgrade(nb, from_version=4, from_minor=nb.nbformat_minor)  # adds cell ids
    nb.metadata.pop("widgets", None)  # widget state and views cannot be shown without the kernel
    nb.metadata.kernelspec = dict(KERNELSPEC)
    for cell in nb.cells:
        for key in ("execution", "ExecuteTime"):  # timings change at every run
            cell.metadata.pop(key, None)
        for out in cell.get("outputs", []):
            out.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)
    write_atomic(path, nbformat.writes(nb) + "\n")


def results(nb):
    "The text after `RESULT:` of every line the notebook printed that starts with it."
    text = "\n".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", [])
                   if out.get("name") == "stdout")
    return [line[len("RESULT:"):].strip() for line in text.splitlines() if line.startswith("RESULT:")]


def shown(path):
    "`path` relative to the current folder when inside it."
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def run_notebook(run, dest, quick, timeout, root, threads):
    "Run one notebook and save it: to `dest` if it ran, else to failed/ beside it."
    before = dest.read_bytes() if dest.exists() else None
    run.status, start = "running", time.monotonic()
    try:
        nb = nbformat.read(run.path, as_version=4)
    except Exception as e:
        run.status, run.failure = "failed", f"cannot read the notebook: {e}"
        return
    error = execute(nb, run.path.parent, kernel_env(root, quick, threads), timeout)
    run.seconds, run.results, failed = time.monotonic() - start, results(nb), dest.parent / "failed" / dest.name
    if error:
        (run.cell, run.failure), target = error, failed
    elif (dest.read_bytes() if dest.exists() else None) != before:  # edited while it ran: keep the edit
        target = dest.parent / "run-copies" / dest.name
        run.note = f" ({shown(dest)} changed on disk while it ran: your version is kept)"
    else:
        target = dest
    save(nb, target)
    run.saved, run.status = target, "failed" if error else "ok"
    if not error:
        failed.unlink(missing_ok=True)


def failure_report(run):
    "Which notebook failed, at which cell, with what error; then the traceback and where it was saved."
    *details, error = run.failure.split("\n")
    where = f", cell {run.cell}" if run.cell is not None else ""
    saved = [f"saved with the error output as {shown(run.saved)}"] if run.saved else []
    return "\n  ".join([f"FAILED: {run.path.name}{where}: {error}", *details, *saved])


def run_notebooks(paths, out_dir=None, quick=False, timeout=3600, root=None, out=None, threads=None):
    "Run the notebooks in order, each once the one before succeeded; a Run each."
    out, runs = out or sys.stdout, [Run(p) for p in paths]
    threads = threads or (1 if quick else None)  # on a busy machine, 2 threads per kernel were 5x slower
    try:
        for run in runs:
            print(f"{run.path.name} ...", end=" ", file=out, flush=True)
            dest = Path(out_dir or run.path.parent) / run.path.name
            run_notebook(run, dest, quick, timeout, Path(root or run.path.parent.parent), threads)
            print(f"ok in {run.seconds:.1f}s, saved as {shown(run.saved)}{run.note}" if run.status == "ok"
                  else "failed\n" + failure_report(run), file=out, flush=True)
            if run.status != "ok":
                break
    except KeyboardInterrupt:
        for run in runs:
            if run.status == "running":
                run.status = "interrupted"
        print(file=out)
        raise
    finally:
        print(summary(runs, quick), file=out, flush=True)
    return runs


def summary(runs, quick=False):
    "Each notebook's status and time, then the RESULT: lines."
    width = max(len(r.name) for r in runs)
    lines = [f"Summary{' (quick mode)' if quick else ''}:"]
    lines += [f"  {r.name:<{width}}  {r.seconds:7.1f}s  " + (f"FAILED at cell {r.cell}" if r.cell is not None
              else r.status.upper() if r.status == "failed" else r.status) for r in runs]
    lines += ["Results:"] * any(r.results for r in runs)
    return "\n".join(lines + [f"  [{number(r.path)}] {res}" for r in runs for res in r.results])


def positive(kind):
    "An argparse type: a number of `kind` (int or float) greater than zero."
    def parse(text):
        if kind(text) <= 0 or not math.isfinite(kind(text)):
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return kind(text)
    parse.__name__ = kind.__name__
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(prog="run_notebooks.py", description="Run the notebooks and save their outputs.")
    p.add_argument("notebooks", nargs="*", help="numbers (or names) of the notebooks to run; default: all")
    p.add_argument("--quick", action="store_true", help="EXP_QUICK=1, one torch thread; saves to nbs/quick/")
    p.add_argument("--out", type=Path, help="folder to save the notebooks in (default: in place)")
    p.add_argument("--timeout", type=positive(float), default=3600, help="seconds a cell may run")
    p.add_argument("--threads", type=positive(int), help="torch threads per kernel (default: 1 with --quick)")
    p.add_argument("--nbs", type=Path, default=NBS, help="the notebooks' folder; its parent is the project")
    p.add_argument("--no-export", action="store_true", help="do not run notebook2script.py --all first")
    args = p.parse_args(argv)
    nbs = numbered_notebooks(args.nbs) if args.nbs.is_dir() else []
    named = lambda nb, w: Path(w).name.lower() in (number(nb), nb.stem.lower(), nb.name.lower())  # noqa: E731
    unknown = [w for w in args.notebooks if not any(named(nb, w) for nb in nbs)]
    if unknown or not nbs:
        p.error(f"no notebook {' '.join(unknown)} in {args.nbs} (have: {', '.join(number(n) for n in nbs) or 'none'})")
    out_dir = args.out or (args.nbs / "quick" if args.quick else None)
    if out_dir and not next(d for d in [out_dir, *out_dir.resolve().parents] if d.exists()).is_dir():
        p.error(f"--out {out_dir}: not a folder")  # found now, not once the notebooks have run
    root = args.nbs.resolve().parent
    wanted = [nb for nb in nbs if not args.notebooks or any(named(nb, w) for w in args.notebooks)]
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stopped, like Ctrl-C, with a summary
    try:
        if not args.no_export:
            print("exporting: python notebook2script.py --all", flush=True)
            if subprocess.run([sys.executable, str(root / "notebook2script.py"), "--all"], cwd=root).returncode:
                print("run_notebooks.py: the export failed; no notebook was run", file=sys.stderr)
                return 1
        runs = run_notebooks(wanted, out_dir, args.quick, args.timeout, root, None, args.threads)
    except KeyboardInterrupt:
        print("run_notebooks.py: interrupted; the notebook that was running was not saved", file=sys.stderr)
        return 130
    return 0 if all(r.status == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
