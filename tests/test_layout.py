"""How llm.py is laid out, as a reader who changes it relies on: the research core (Config to
Evaluation) needs nothing defined below the MACHINERY banner but its error classes, so a new
router, FFN or schedule is read and written above it; and the machinery knows nothing of the
harness (jobs, budgets, ladders, a run's progress): what it stores, it takes as plain data."""

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


def uses(tree, users, names):
    """Which of names the top-level definitions starting within the range `users` use: name -> users."""
    used = {}
    for node in tree.body:
        if node.lineno in users:
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and sub.id in names:
                    used.setdefault(sub.id, set()).add(getattr(node, "name", node.lineno))
    return used


def layout():
    text = SOURCE.read_text()
    lines = text.splitlines()
    return lines, ast.parse(text), defined_at(ast.parse(text))


def test_the_research_core_uses_nothing_below_the_machinery_banner_but_its_error_classes():
    lines, tree, defined = layout()
    core = range(banner(lines, "# Config"), banner(lines, "# Data:"))  # Config, Model, ..., Training, Evaluation
    below = {name for name, line in defined.items() if line > banner(lines, "# MACHINERY")}
    used = uses(tree, core, below - ERRORS)
    assert not used, f"the core reaches below the banner: {used}"
    assert len(core) < 1200  # about 1,100 lines: what a reader takes in first


def test_the_machinery_uses_no_name_of_the_harness():
    """Between the banner and the command line (which drives the harness), nothing defined from
    `Running one model` to the banner is used: the arrows run one way."""
    lines, tree, defined = layout()
    harness = range(banner(lines, "# Running one model"), banner(lines, "# MACHINERY"))
    machinery = range(banner(lines, "# MACHINERY"), banner(lines, "# Command line"))
    used = uses(tree, machinery, {name for name, line in defined.items() if line in harness})
    assert not used, f"the machinery reaches up into the harness: {used}"
