"""Installs the `exp` package: the modules exported from the notebooks in nbs/."""
from setuptools import setup

jupyter = ['jupyter', 'ipywidgets', 'nbformat', 'nbclient', 'ipykernel']
# tests/test_browser.py: JupyterLab driven in Chromium by Playwright. Playwright drives the system's
# Chromium (Debian's package `chromium`, which .ci/run installs); it never downloads a browser.
browser = ['jupyterlab>=4', 'playwright', 'nbconvert']

setup(
    name='exp-lesson10',
    version='0.1.0',
    description='A from-scratch deep learning teaching library: the training loop, hooks, init and norms of lesson 10, on plain PyTorch.',
    license='Apache-2.0',
    packages=['exp'],
    python_requires='>=3.10',
    install_requires=['torch', 'matplotlib', 'tqdm', 'nbformat'],
    extras_require={'jupyter': jupyter, 'test': jupyter + ['pytest'], 'browser': jupyter + browser},
)
