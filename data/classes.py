"""``classes.json``: the class names and prompt templates of a zero-shot evaluation set."""

from __future__ import annotations

import json
from pathlib import Path

from training.errors import UserError


def load_classes(path: str | Path) -> tuple[list[str], list[str]]:
    """``classes.json`` -> (class names, prompt templates with one ``{}`` each)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"classes file not found: {path}")
    try:
        raw = json.loads(path.read_text())
        classes, templates = list(raw["classes"]), list(raw["templates"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{path} must be JSON with 'classes' and 'templates' lists ({error})") from None
    if not classes or not templates or any(t.count("{}") != 1 for t in templates):
        raise UserError(f"{path}: need non-empty classes and templates each with exactly one '{{}}'")
    return classes, templates
