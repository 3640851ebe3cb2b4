"""What the study scripts (bs2_seeds.py, layernorm_ablation.py) share: their runs kept in <out>/<name>.json, written
again after every run, and the markdown table made from it in <out>/<name>.md. Both files are written atomically
(temporary file + os.replace): an interrupted study never leaves half a file, and a study run again resumes."""
import datetime, json, os, platform, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from notebook2script import write_atomic  # noqa: E402


class StudyResults:
    "The runs of the study `name` in `out`, and `table(results)`, the markdown made from them."
    def __init__(self, out, name, table):
        self.json_path, self.md_path, self.table = Path(out) / f'{name}.json', Path(out) / f'{name}.md', table

    def rewrite_table(self, parser):
        "For --table: the markdown again from the JSON, printed."
        if not self.json_path.is_file(): parser.error(f'--table: {self.json_path} does not exist; run the study first')
        write_atomic(self.md_path, self.table(json.loads(self.json_path.read_text())))
        print(self.md_path.read_text())

    def load(self, parser, recipe, script, argv, torch_version):
        "The runs made so far (a clear error when they were made with another recipe), described as made by this command."
        results = json.loads(self.json_path.read_text()) if self.json_path.exists() else {'runs': {}}
        if results['runs'] and results['meta']['recipe'] != recipe:
            parser.error(f'{self.json_path} holds runs of another recipe ({results["meta"]["recipe"]}): move it away or pass --out')
        args = argv if argv is not None else sys.argv[1:]
        results['meta'] = {'command': f'python benchmarks/{script}' + ''.join(f' {a}' for a in args),
                           'machine': f'{platform.machine()} CPU, {os.cpu_count()} cores, 1 torch thread',
                           'torch': torch_version, 'date': datetime.date.today().isoformat(), 'recipe': recipe}
        return results

    def save(self, results):
        "Both files, after every run."
        write_atomic(self.json_path, json.dumps(results, indent=1, sort_keys=True))
        write_atomic(self.md_path, self.table(results))
