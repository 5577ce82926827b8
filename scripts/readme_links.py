"""Point the README's links into the code at the lines they name.

    python scripts/readme_links.py          # rewrite README.md in place
    python scripts/readme_links.py --check  # list the links that are off, exit 1 if any

A link reads [`name`](file.py#L12) or [`name`](file.py#L12-L30). `name` is a
function or class (`softcap`, `KVCache`), a method (`Gemma2Model.forward`), a
module-level name (`CONFIGS`), or any other text that the target line
contains (`q_norm, k_norm`, `gemma-3-27b`). Functions, classes and methods get
the range of their definition; other names the first line that contains them.
tests/test_readme.py runs the check, so a README link cannot drift.
"""

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[`([^`]+)`\]\(([\w./-]+\.py)#L(\d+)(?:-L(\d+))?\)")


def definitions(source):
    """{"name" or "Class.method": (first line, last line)} of a module's definitions."""
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = (node.lineno, node.end_lineno)
            for item in node.body if isinstance(node, ast.ClassDef) else []:
                if isinstance(item, ast.FunctionDef):
                    found[f"{node.name}.{item.name}"] = (item.lineno, item.end_lineno)
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = (node.lineno, node.end_lineno)
    return found


def where(file, name):
    """(first, last) line of `name` in `file`, or None when it is not there."""
    source = (ROOT / file).read_text()
    key = name.split("(")[0].strip()
    if key in definitions(source):
        return definitions(source)[key]
    token = name.split(",")[0].split("(")[0].strip()
    for number, line in enumerate(source.splitlines(), 1):
        if token and token in line:
            return number, number
    return None


def fixed(match):
    name, file = match.group(1), match.group(2)
    span = where(file, name)
    if span is None:
        raise SystemExit(f"README link to {file}: {name!r} is not in the file")
    first, last = span
    anchor = f"L{first}" if first == last else f"L{first}-L{last}"
    return f"[`{name}`]({file}#{anchor})"


def main(argv):
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = LINK.sub(fixed, text)
    if "--check" in argv:
        off = [(a.group(0), b.group(0)) for a, b in zip(LINK.finditer(text), LINK.finditer(new)) if a.group(0) != b.group(0)]
        for old, good in off:
            print(f"{old} should be {good}")
        return 1 if off else 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
