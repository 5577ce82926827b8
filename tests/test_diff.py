"""`diff gemma.py gemma2.py` is the lesson: every hunk is one of Gemma 2's changes or a rename.

The README promises that gemma2.py is gemma.py plus exactly the changes listed
in its "From Gemma to Gemma 2" table. That promise drifts silently (a comment
reworded in one file, a helper rewritten with other names), so it is checked
here: each hunk of the diff must touch a line that names one of those changes
or one of the renamed classes, each change must be in the README's table, and
the diff must stay small.
"""

import difflib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each change of the README's table, with the words that name it in the code.
CHANGES = {
    "Local attention": r"sliding|window|local|layer_types|\bmasks?\b",
    "soft-capped": r"softcap|soft-cap|tanh",
    "query_pre_attn_scalar": r"query_pre_attn_scalar|self\.scale|H\*\*-0\.5",
    "Sandwich norms": r"[Ss]andwich|feedforward_layernorm|post_attention_layernorm",
    "GQA in every size": r"num_key_value_heads|grouped-query",
    "Presets": r"CONFIGS|gemma-2-|hidden_size: int|intermediate_size: int|num_hidden_layers: int",
}
RENAME = r"\bGemma2?(Config|Attention|MLP|DecoderLayer|Model|ForCausalLM|ForSequenceClassification|ForTokenClassification)\b"
# Changed lines (both sides) of the whole diff, the module docstring included.
# Every Gemma 2 change with the line that says why, and nothing else, fits here.
MOST_CHANGED_LINES = 145


def hunks():
    """(lines of gemma.py, lines of gemma2.py) of each hunk, outside the module docstrings."""
    old, new = ((ROOT / f).read_text().splitlines() for f in ("gemma.py", "gemma2.py"))
    body = lambda lines: lines.index("import math")  # noqa: E731  the docstring ends before it
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    for tag, a, b, c, d in matcher.get_opcodes():
        if tag != "equal" and (a >= body(old) or c >= body(new)):
            yield old[a:b], new[c:d]


def test_every_hunk_of_the_diff_names_a_gemma2_change_or_a_renamed_class():
    pattern = re.compile("|".join([*CHANGES.values(), RENAME]))
    unexplained = [(a, b) for a, b in hunks() if not any(pattern.search(line) for line in a + b)]
    assert not unexplained, "hunks that are neither a Gemma 2 change nor a rename:\n" + "\n---\n".join(
        "\n".join(["< " + x for x in a] + ["> " + x for x in b]) for a, b in unexplained
    )


def test_every_change_is_in_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## From Gemma to Gemma 2") :]
    table = section[: section.index("\n\n", section.index("|"))]
    assert [c for c in CHANGES if c not in table] == []


def test_the_diff_stays_small():
    old, new = ((ROOT / f).read_text().splitlines() for f in ("gemma.py", "gemma2.py"))
    changed = [line for line in difflib.unified_diff(old, new, lineterm="", n=0) if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert len(changed) <= MOST_CHANGED_LINES
