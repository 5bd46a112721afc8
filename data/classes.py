"""``classes.json``: the class names and prompt templates of a zero-shot evaluation set.

A sample's label is the ``class`` field of its ``.json`` sidecar, one of the names listed here.
"""

from __future__ import annotations

import json
import string
from collections import Counter
from pathlib import Path

from training.errors import UserError

LABEL_KEY = "class"  # the sidecar field that names a sample's class


def is_template(text: str) -> bool:
    """Exactly one bare ``{}`` and no other replacement field, so ``text.format(name)`` places the name
    and cannot fail (a format spec such as ``{:>1000000000000}`` would run it out of memory)."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(text) if name is not None]
    except ValueError:  # a lone brace
        return False
    return fields == [("", "", None)]


def repeated_names(names: list[str]) -> list[str]:
    """The names listed more than once, sorted (one pass: ImageNet-21k has 21,841 classes)."""
    return sorted(name for name, count in Counter(names).items() if count > 1)


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
    repeated = repeated_names(classes)
    if repeated:
        raise UserError(f"{path}: class names must be unique; repeated: {', '.join(map(repr, repeated[:5]))}")
    for template in templates:
        if not is_template(template):
            raise UserError(f"{path}: template {template!r} must hold exactly one '{{}}' for the class name "
                            "and no other braces (write a literal brace as '{{' or '}}')")
    return classes, templates
