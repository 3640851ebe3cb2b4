"""benchmarks/bench.py runs and prints its table (a smoke test: the timings themselves are never asserted)."""
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import bench  # noqa: E402

ROW = re.compile(r'^\| (.+) \| (\d+\.\d{4}) \| (\d+\.\d{4}) \| (\d+\.\d\d)x \|$')


def test_sections_print_one_row_per_figure(capsys):
    bench.main(['dataloader', 'running_batchnorm', '--repeats', '1'])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('machine: ') and lines[0].endswith('median of 1')
    assert lines[1:3] == ['| benchmark | ours (s) | reference (s) | ratio |', '|---|---:|---:|---:|']
    rows = [ROW.match(l) for l in lines[3:]]
    assert all(rows), [l for l, r in zip(lines[3:], rows) if not r]
    assert len(rows) == 6 + 9  # 3 batch sizes x (in order, shuffled); 3 batch sizes x 3 comparisons
    assert [r.group(1) for r in rows][:2] == ['DataLoader in order, bs=2 / slicing',
                                              'DataLoader shuffled, bs=2 / indexing by randperm']
    assert all(float(r.group(4)) > 0 for r in rows)


@pytest.mark.parametrize('argv, message', [(['nonsense'], 'unknown section(s) nonsense'),
                                           (['--repeats', '0'], '--repeats must be at least 1')])
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e: bench.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
