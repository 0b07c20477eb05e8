"""The one way HTML is made: Jinja2 templates of a package's ``templates/`` folder, rendered by an
environment that escapes every value (autoescaping on, undefined names an error). The lab's pages
and the HTML report both come from here; no HTML is built in Python (tests/lab/test_html_by_templates.py)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jinja2 import Environment


@functools.cache
def template_environment(package: str) -> Environment:
    """The escaping environment of ``package``'s ``templates/`` folder."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    return Environment(
        loader=PackageLoader(package, "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_template(package: str, name: str, **context: Any) -> str:
    """``package``'s template ``name`` with ``context``, every value escaped."""
    return template_environment(package).get_template(name).render(**context)
