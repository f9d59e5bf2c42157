"""Layout rules of the source tree (the developers' guide): no source file in graphc/, passes/ or backends/
over 800 lines, no function over 100 lines (nested functions count toward the function around them)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("graphc", "passes", "backends")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 800, 100

# Known offenders, each being changed on another branch; an entry that is no longer over the limit fails
# the test too, so that it is removed (the list only shrinks).
KNOWN = {
}


def _offenders():
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            src = path.read_text(encoding="utf-8")
            lines = src.count("\n") + (not src.endswith("\n"))
            if lines > MAX_FILE_LINES:
                found[rel] = f"{lines} lines"
            for node in ast.walk(ast.parse(src, filename=rel)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        found[f"{rel}:{node.name}"] = f"{n} lines"
    return found


def test_no_long_files_or_functions():
    found = _offenders()
    new = {k: v for k, v in found.items() if k not in KNOWN}
    assert not new, (f"over {MAX_FILE_LINES} lines per file / {MAX_FUNCTION_LINES} per function: {new}; "
                     "split them (the guide's limits)")
    stale = [k for k in KNOWN if k not in found]
    assert not stale, f"no longer over the limits, remove from KNOWN in tests/test_layout.py: {stale}"
