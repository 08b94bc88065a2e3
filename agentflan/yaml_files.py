"""YAML files users write (training configs, data recipes): parsed strictly, errors on one line.

PyYAML's safe loader lets a repeated key silently replace the first one (a recipe with two
``sources:`` keys would drop the first list), and its error messages span several lines with
a caret drawing. ``load_yaml`` refuses repeated keys and reports any error as one line,
``FILE:LINE:COLUMN: what is wrong``.
"""

from __future__ import annotations

from typing import Any

import yaml


class YamlFileError(ValueError):
    """A file that is not valid YAML, or a mapping that repeats a key; the message is one
    line naming the file, line and column."""


class _RepeatedKey(yaml.constructor.ConstructorError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated within one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first is not None:
                raise _RepeatedKey(None, None, f"key {key!r} repeated (first on line {first}); the later one "
                                               f"would silently replace it", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, name: str) -> Any:
    """The document in ``text`` (YAML 1.1 as PyYAML's safe loader reads it; JSON is YAML too).
    ``name`` (the file) starts every error message. Raises YamlFileError."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except _RepeatedKey as err:
        mark = err.problem_mark
        raise YamlFileError(f"{name}:{mark.line + 1}:{mark.column + 1}: {err.problem}") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else name
        context = err.context or ""
        if err.context and err.context_mark is not None and err.context_mark is not mark:
            context += f" begun on line {err.context_mark.line + 1}, column {err.context_mark.column + 1}"
        what = "; ".join(part for part in (context, (err.problem or "").replace("'<stream end>'", "the end of the file"))
                         if part)
        raise YamlFileError(f"{where}: not valid YAML: {what}") from None
    except yaml.YAMLError as err:
        raise YamlFileError(f"{name}: not valid YAML: {' '.join(str(err).split())}") from None
