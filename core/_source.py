"""Fingerprints of Python source that ignore what cannot change a result: docstrings, comments, layout.

The source-change guard (``repdissect status``: "the stage's source changed but its version was not
bumped") compares these fingerprints of the modules a stage's result depends on (``Stage.depends_on``)
with the ones recorded in the cache entry's manifest. A fingerprint is the SHA-256 of the module's abstract
syntax tree (``ast.dump`` without line numbers) after removing every docstring — the module's, each class's
and each function's — so rewording documentation, adding comments or reformatting flags nothing, while any
change to the code, constants included, does.
"""

from __future__ import annotations

import ast
import hashlib
from typing import Iterable

__all__ = ["source_fingerprint"]

_SCOPES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _strip_docstrings(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        if not isinstance(node, _SCOPES) or not node.body:
            continue
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            node.body = node.body[1:] or [ast.Pass()]


def source_fingerprint(source: str, *, drop_classes: Iterable[str] = ()) -> str:
    """Hex SHA-256 of ``source``'s syntax tree without docstrings, comments or formatting.

    Args:
        source: the text of one Python module.
        drop_classes: names of top-level classes to leave out (e.g. the other stages declared in the same
            module, so that editing one stage does not flag its neighbours).

    Raises:
        SyntaxError: when ``source`` does not parse.
    """
    tree = ast.parse(source)
    dropped = set(drop_classes)
    if dropped:
        tree.body = [n for n in tree.body if not (isinstance(n, ast.ClassDef) and n.name in dropped)]
    _strip_docstrings(tree)
    text = ast.dump(tree, annotate_fields=False, include_attributes=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
