"""The README's Python example runs as it is written."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path):
    text = README.read_text()
    match = re.search(r"<!-- python-example -->\n```python\n(.*?)```\n<!-- /python-example -->", text, re.S)
    assert match, "the README lost its marked Python example"
    script = tmp_path / "example.py"
    script.write_text(match.group(1))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'stage': 'stage2'" in out.stdout and "'epoch': 10" in out.stdout
