"""A student runs the cells in order: each code cell may use only the names bound by earlier cells, by a star
import (`from exp.nb_06 import *`), or builtins. A name that a later cell binds is a trap: the cell works in a
kernel where the later cell already ran, and fails with NameError in a fresh one (or when called later).

The check reads every numbered notebook in nbs/ without running it. Names used inside functions and classes
count too (a method that calls `warnings.warn` needs `warnings` when it is called, not when it is defined, but a
student who runs the notebook in order calls it before the later cell). Within one cell the order is not checked.
"""
import ast
import builtins
import importlib
import re
import symtable
from pathlib import Path

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager

NBS = Path(__file__).resolve().parent.parent / 'nbs'
NOTEBOOKS = sorted(p for p in NBS.glob('*.ipynb') if re.match(r'\d+[a-z]*_', p.name))
# What an IPython kernel's namespace holds before any cell runs.
KERNEL_NAMES = {'get_ipython', 'display', 'In', 'Out', 'exit', 'quit', '_', '__', '___', '_i', '_ii', '_iii',
                '_ih', '_oh', '_dh', '__name__', '__doc__', '__builtins__'}


def star_names(module_name):
    "The names `from module_name import *` binds."
    module = importlib.import_module(module_name)
    return set(getattr(module, '__all__', None) or [n for n in dir(module) if not n.startswith('_')])


def bound_and_used(source):
    "(names a cell binds at top level, names it needs from outside: at top level or inside its functions)."
    code = TransformerManager().transform_cell(source)   # %magics and !shell lines become plain Python
    top = symtable.symtable(code, '<cell>', 'exec')
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and any(a.name == '*' for a in node.names):
            bound |= star_names(node.module)
    used = {s.get_name() for s in top.get_symbols() if s.is_referenced()}

    def inner(table):
        for child in table.get_children():
            for s in child.get_symbols():
                if s.is_global() and s.is_referenced(): used.add(s.get_name())
                if s.is_declared_global() and s.is_assigned(): bound.add(s.get_name())
            inner(child)
    inner(top)
    return bound, used - bound


def forward_references(cells):
    "[(cell index, sorted names)] for each code cell that uses a name no earlier cell, star import or builtin binds."
    known = set(dir(builtins)) | KERNEL_NAMES
    problems = []
    for i, cell in enumerate(cells):
        if cell.cell_type != 'code' or not cell.source.strip(): continue
        bound, used = bound_and_used(cell.source)
        missing = sorted(used - known)
        if missing: problems.append((i, missing))
        known |= bound
    return problems


def test_the_check_finds_a_name_bound_only_by_a_later_cell():
    cells = [nbformat.v4.new_code_cell(s) for s in [
        '%matplotlib inline\nimport math',
        'class LR_Find:\n    def stop(self): warnings.warn(str(math.pi))',    # `warnings` comes a cell too late
        'import warnings\nx = [y for y in range(3)]\ndef f(a): return a + x[0]',
        'print(f(1), undefined_name)']]
    assert forward_references(cells) == [(1, ['warnings']), (3, ['undefined_name'])]


def test_the_check_knows_star_imports_and_globals_set_in_functions():
    cells = [nbformat.v4.new_code_cell(s) for s in [
        'from math import *\ndef setup():\n    global ready\n    ready = True',
        'print(pi, sqrt(2), ready)']]
    assert forward_references(cells) == []


@pytest.mark.parametrize('path', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_cell_uses_only_names_bound_before_it(path):
    nb = nbformat.read(path, as_version=4)
    problems = forward_references(nb.cells)
    assert not problems, f'{path.name}: ' + '; '.join(f'cell {i} uses {", ".join(names)} before any cell binds it'
                                                      for i, names in problems)
