"""Every notebook runs top to bottom without an error, in quick mode (EXP_QUICK=1), in a fresh kernel.

Each notebook runs through run_notebooks.py into a temporary folder, so the committed notebooks are
never touched. A notebook imports the modules before it from exp/ (committed; CI checks they match
the notebooks), so each one can run on its own. The sequence starts with 00_data (data loading, test
helpers, `quick_mode()`) where it exists, else with 05_training_loop. The notebooks need the real
data: without EXP_DATA_DIR these tests are skipped.
"""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import run_notebooks as rn  # noqa: E402

pytest.importorskip("nbclient")

NOTEBOOKS = rn.numbered_notebooks(ROOT / "nbs")
needs_data = pytest.mark.skipif(not os.environ.get("EXP_DATA_DIR"),
                                reason="the notebooks need MNIST: set EXP_DATA_DIR to the folder holding "
                                       "mnist/ and fashion-mnist/ (CI sets EXP_DATA_DIR=../shared/data)")


def test_the_sequence_starts_with_00_data_or_05_training_loop():
    names = [p.name for p in NOTEBOOKS]
    first = "00_data.ipynb" if "00_data.ipynb" in names else "05_training_loop.ipynb"
    assert names[:1] == [first] and "05_training_loop.ipynb" in names


@needs_data
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_quick_mode(path, tmp_path, capsys):
    before = path.read_bytes()
    runs = rn.run_notebooks([path], out_dir=tmp_path, quick=True, timeout=900, root=ROOT)
    run = runs[0]
    assert run.status == "ok", rn.failure_report(run)
    assert (tmp_path / path.name).is_file()
    assert path.read_bytes() == before  # the committed notebook is left alone
