"""``classes.json``: the class names and prompt templates of a zero-shot evaluation set.

A sample's label is the ``class`` field of its ``.json`` sidecar, one of the names listed here.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from training.errors import UserError

LABEL_KEY = "class"  # the sidecar field that names a sample's class


def load_classes(path: str | Path) -> tuple[list[str], list[str]]:
    """``classes.json`` -> (class names, prompt templates with one ``{}`` each)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"classes file not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        classes, templates = raw["classes"], raw["templates"]
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} must be JSON with 'classes' and 'templates' lists ({error})") from None
    for key, values in (("classes", classes), ("templates", templates)):
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise UserError(f"{path}: '{key}' must be a non-empty list of strings")
    repeated = sorted({name for name in classes if classes.count(name) > 1})
    if repeated:
        raise UserError(f"{path}: class names must be unique; repeated: {', '.join(map(repr, repeated[:5]))}")
    for template in templates:
        try:  # exactly one bare {} and no other field: a format spec such as {:>1000000000000} would run
            # ``template.format`` out of memory
            fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)
                      if name is not None]
            ok = fields == [("", "", None)]
        except ValueError:
            ok = False
        if not ok:
            raise UserError(f"{path}: template {template!r} must hold exactly one '{{}}' for the class name "
                            "and no other braces (write a literal brace as '{{' or '}}')")
    return classes, templates
