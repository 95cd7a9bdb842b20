"""MkDocs hook: the Sphinx roles of the docstrings (:func:`name`) show as plain code (`name`) in the API pages.

mkdocstrings renders the docstrings as Markdown, where a role stays as text in front of the code span.
"""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:func|mod|meth|data|class|attr|obj|exc):(?=<code>)")


def on_page_content(html: str, **kwargs: object) -> str:
    return ROLE.sub("", html)
