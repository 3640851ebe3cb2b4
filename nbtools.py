"""What notebook2script.py and run_notebooks.py share: the project's folders, which notebooks are
numbered, and writing a file so that a reader sees the old file or the new one, never half of one."""
import os
import re
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
NBS, EXP = ROOT / "nbs", ROOT / "exp"
NUMBERED = re.compile(r"(\d+[a-zA-Z]*)_.*\.ipynb")  # 05_x.ipynb, 05b_x.ipynb, 05B_x.ipynb


def number(path):
    "The number of a numbered notebook, in lower case ('05b' for 05B_x.ipynb); None for other files."
    match = NUMBERED.fullmatch(Path(path).name)
    return match.group(1).lower() if match else None


def numbered_notebooks(folder):
    "The numbered notebooks directly inside `folder`, in the order they run: 00, 05, 05a, 05b, 06..."
    return sorted((p for p in Path(folder).iterdir() if p.is_file() and number(p)),
                  key=lambda p: (number(p), p.name))


def write_atomic(path, data):
    "Write `data` (str or bytes) to a temporary file beside `path`, then move it into place (through a symbolic link)."
    path = Path(path)
    if path.is_symlink():  # write the file it points to: replacing the link would leave the real file unchanged
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
