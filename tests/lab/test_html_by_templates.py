"""Escape by construction (issue 28): every HTML response of the lab and the HTML report comes
from the autoescaping Jinja environments. Checked on the syntax trees, not with a grep: no Python
string that builds markup (an f-string, ``.format``, ``%``, ``+``, ``join`` or ``re.sub`` with a
tag in it), no ``Markup``, and no template that marks a value safe or turns autoescaping off."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from jinja2 import Environment, nodes

REPO = Path(__file__).resolve().parents[2]
PYTHON = sorted((REPO / "wbc_tasks" / "lab").glob("*.py")) + [REPO / "wbc_tasks" / "serving" / "report.py"]
TEMPLATES = sorted((REPO / "wbc_tasks" / "lab" / "templates").glob("*.html")) + sorted(
    (REPO / "wbc_tasks" / "serving" / "templates").glob("*.html")
)
TAG = re.compile(r"</?[a-zA-Z!]")


def _literal_text(node: ast.AST) -> str:
    """The literal parts of a string expression (f-string constants included)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_literal_text(v) for v in node.values)
    return ""


def markup_builders(source: str) -> list[str]:
    """Places in ``source`` that build HTML out of Python strings."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.JoinedStr) and TAG.search(_literal_text(node)):
            found.append(f"{where}: f-string with markup")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mod):
            if any(TAG.search(_literal_text(side)) for side in (node.left, node.right)):
                found.append(f"{where}: markup built with {type(node.op).__name__}")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            owner = _literal_text(func.value) if isinstance(func, ast.Attribute) else ""
            arguments = "".join(_literal_text(a) for a in node.args)
            if name == "Markup":
                found.append(f"{where}: Markup()")
            elif name in ("format", "join") and TAG.search(owner):
                found.append(f"{where}: markup built with .{name}")
            elif name in ("sub", "subn") and TAG.search(arguments):
                found.append(f"{where}: markup spliced with re.{name}")
    return found


@pytest.mark.parametrize("path", PYTHON, ids=lambda p: str(p.relative_to(REPO)))
def test_no_python_code_of_the_pages_builds_html(path):
    assert markup_builders(path.read_text()) == []


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_template_marks_a_value_safe_or_turns_escaping_off(path):
    tree = Environment(autoescape=True).parse(path.read_text())
    filters = {f.name for f in tree.find_all(nodes.Filter)}
    assert not filters & {"safe"}, f"{path.name} uses |safe"
    assert not list(tree.find_all(nodes.ScopedEvalContextModifier)), f"{path.name} changes autoescaping"
    assert not list(tree.find_all(nodes.EvalContextModifier)), f"{path.name} changes autoescaping"


def test_the_check_finds_each_way_of_building_markup():
    """The checker itself, on the shapes it must refuse (the stored XSS was an f-string + re.sub)."""
    sources = [
        "bar = f'<a href=\"{link}\">All drops</a>'",
        'page = "<p>" + name',
        'page = "<b>%s</b>" % name',
        'page = "<li>{}</li>".format(name)',
        'page = "<br>".join(names)',
        're.sub(r"(<body>)", lambda m: m.group(1) + bar, html)',
        "from markupsafe import Markup\nsafe = Markup(name)",
    ]
    for source in sources:
        assert markup_builders(source), source
    assert markup_builders('text = f"{count} cells"') == []
