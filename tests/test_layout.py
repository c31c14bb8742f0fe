"""How llm.py is laid out, as a reader who changes it relies on: the research core (Config to
Evaluation) needs nothing defined below the MACHINERY banner but its error classes, so a new
router, FFN or schedule is read and written above it."""

import ast
import pathlib

SOURCE = pathlib.Path(__file__).resolve().parents[1] / "llm.py"
ERRORS = {"UsageError", "TrainingError", "Interrupted", "Stopped"}


def banner(lines, text):
    """The line number (1-based) of the one comment line that starts with text."""
    (found,) = [i for i, line in enumerate(lines, 1) if line.startswith(text)]
    return found


def defined_at(tree):
    """Each top-level name of the module -> the line that defines it."""
    names = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = node.lineno
        elif isinstance(node, ast.Assign):
            names.update({t.id: node.lineno for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node.lineno
    return names


def test_the_research_core_uses_nothing_below_the_machinery_banner_but_its_error_classes():
    text = SOURCE.read_text()
    lines, tree = text.splitlines(), ast.parse(text)
    core = range(banner(lines, "# Config"), banner(lines, "# Data:"))  # Config, Model, ..., Training, Evaluation
    machinery = banner(lines, "# MACHINERY")
    below = {name for name, line in defined_at(tree).items() if line > machinery}
    used = {}
    for node in tree.body:
        if node.lineno in core:
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and sub.id in below - ERRORS:
                    used.setdefault(sub.id, set()).add(getattr(node, "name", node.lineno))
    assert not used, f"the core reaches below the banner: {used}"
    assert len(core) < 1200  # about 1,100 lines: what a reader takes in first
