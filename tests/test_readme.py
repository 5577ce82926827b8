"""The README's links into the code land on the lines they name (scripts/readme_links.py fixes them)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_link_into_the_code_points_at_the_definition_it_names():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_links.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, "run scripts/readme_links.py to fix:\n" + out.stdout + out.stderr


def test_the_readme_links_into_each_model_file():
    readme = (ROOT / "README.md").read_text()
    for file in ("gemma.py", "gemma2.py", "gemma3.py"):
        if (ROOT / file).exists():
            assert f"]({file}#L" in readme, file
