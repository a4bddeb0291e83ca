"""No code outside ``distq.quant.methods`` decides anything by a quantizer method's name: the
exporters, the integer engine, the controller and the configs ask the method object
(``distq.quant.methods.base``), so adding a method is one module there."""

from __future__ import annotations

import re
from pathlib import Path

from distq.quant.methods import method_keys

DISTQ = Path(__file__).resolve().parents[2] / "distq"


def comparisons() -> list[re.Pattern]:
    keys = "|".join(map(re.escape, method_keys()))
    quoted = rf"""["']({keys})["']"""
    return [
        re.compile(rf"[=!]=\s*{quoted}"),  # x == "aqe", x != "dorefa"
        re.compile(rf"{quoted}\s*[=!]="),  # "aqe" == x
        re.compile(rf"\b(not\s+)?in\s*[\(\[\{{]\s*{quoted}"),  # x in ("dorefa", ...), x not in ["lsq", ...]
        re.compile(rf"{quoted}\s*(not\s+)?in\b"),  # "aqe" in methods
        re.compile(rf"\bcase\s+{quoted}"),  # match method: case "pact"
    ]


def offending_lines(root: Path = DISTQ) -> list[str]:
    patterns = comparisons()
    hits = []
    for path in sorted(root.rglob("*.py")):
        if path.is_relative_to(root / "quant" / "methods"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(p.search(code) for p in patterns):
                hits.append(f"{path.relative_to(root.parent)}:{number}: {line.strip()}")
    return hits


def test_the_patterns_find_comparisons_with_every_key(tmp_path):
    """The check itself: it finds each form, with each registered key, and nothing else."""
    keys = method_keys()
    assert {"dorefa", "aqe", "lsq", "pact"} <= set(keys)
    package = tmp_path / "distq"
    (package / "quant" / "methods").mkdir(parents=True)
    (package / "quant" / "methods" / "x.py").write_text('key == "dorefa"\n')  # the methods' own: allowed
    lines = [f'if layer.method == "{keys[0]}":', f"elif '{keys[-1]}' != m:", f'ok = method in ("{keys[1]}", "x")']
    lines += ['x = "dorefa"', 'name in ("stochastic", "aqe")', "# method == 'aqe' in a comment", 'key = {"lsq": 1}']
    (package / "code.py").write_text("\n".join(lines) + "\n")
    assert [hit.split(":")[1] for hit in offending_lines(package)] == ["1", "2", "3"]


def test_no_module_outside_the_methods_compares_a_method_name():
    hits = offending_lines()
    assert not hits, "compare no method key outside distq/quant/methods (ask the method object instead):\n" + "\n".join(hits)
