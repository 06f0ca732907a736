"""Reading a recipe file: YAML with a source position for every node, and ``${name}`` variables.

The file is *composed* (not constructed) with PyYAML's safe loader, so every mapping, list and scalar keeps its
``start_mark``; schema and semantic errors found later can then point at ``recipe.yaml:LINE:COLUMN``. Nothing
is executed: no Python tags, only plain YAML (mappings, lists, strings, numbers, booleans, null). Anchors and
aliases work (an alias reports the anchor's position); merge keys (``<<``) and multiple documents are refused.

Variables
---------
``vars:`` declares variables with their default values (plain scalars). Any *string value* elsewhere in the
recipe may use ``${name}``; ``$${`` writes a literal ``${``. ``--set name=value`` (:func:`parse_sets`)
overrides a default; a name that is not declared is an error (with the nearest declared name), so a typo on
the command line cannot silently do nothing. Substitution is textual, and a value that used a variable is
typed by the schema: where a number is expected, ``weight: ${w}`` or ``{weight: "${w}"}`` (inside ``{...}``
YAML needs the quotes) with ``w=0.5`` is the number 0.5; where text is expected, ``title: ${v}`` with
``v=2024`` is the text ``"2024"``. Variable values cannot themselves contain ``${...}``, and mapping keys are
never substituted.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..errors import PlanError

__all__ = [
    "Issue",
    "RecipeError",
    "Where",
    "LoadedYaml",
    "load_yaml",
    "parse_sets",
    "substitute",
    "is_substituted",
    "retyped",
    "to_python",
    "where_of",
    "VAR_NAME",
]

#: A variable name: a letter or underscore, then letters, digits, underscores.
VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}")

STR = "tag:yaml.org,2002:str"
INT = "tag:yaml.org,2002:int"
FLOAT = "tag:yaml.org,2002:float"
BOOL = "tag:yaml.org,2002:bool"
NULL = "tag:yaml.org,2002:null"
MERGE = "tag:yaml.org,2002:merge"


@dataclass(frozen=True, order=True)
class Where:
    """A position in a recipe file (1-based line and column), printed ``file:line:column``."""

    file: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        if not self.line:
            return self.file
        return f"{self.file}:{self.line}:{self.column}"


def where_of(node: yaml.Node | None, file: str) -> Where:
    """The position of ``node`` (its first character), or just the file when there is no node."""
    if node is None or node.start_mark is None:
        return Where(file)
    m = node.start_mark
    return Where(file, m.line + 1, m.column + 1)


@dataclass(frozen=True)
class Issue:
    """One problem in a recipe: where it is and what is wrong (one sentence or a short paragraph)."""

    where: Where
    message: str
    severity: str = "error"  # "error" or "warning"

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.severity == "error" else f"{self.where}: warning: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.where.file, "line": self.where.line or None, "column": self.where.column or None,
                "severity": self.severity, "message": self.message}


class RecipeError(PlanError):
    """An invalid recipe: every problem found, one ``file:line:column: message`` per line."""

    def __init__(self, issues: Sequence[Issue]):
        errors = [i for i in issues if i.severity == "error"] or list(issues)
        self.issues = sorted(errors, key=lambda i: (i.where.file, i.where.line, i.where.column))
        n = len(self.issues)
        head = "the recipe is invalid" if n == 1 else f"the recipe is invalid ({n} problems)"
        super().__init__(f"{head}:\n" + "\n".join(str(i) for i in self.issues))


@dataclass
class LoadedYaml:
    """A composed recipe file: the root node and the file name used in positions."""

    root: yaml.MappingNode
    file: str
    path: Path
    text: str = field(repr=False, default="")


def _yaml_error(exc: yaml.YAMLError, file: str) -> Issue:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = Where(file, mark.line + 1, mark.column + 1) if mark is not None else Where(file)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"{context}, {problem}" if context else problem
    if "expected a single document" in text:
        text = ("the file holds more than one YAML document (a '---' line); a recipe is one document")
    elif "found character '\\t'" in text:
        text += " (YAML indentation must use spaces, not tabs)"
    return Issue(where, f"not valid YAML: {text}.")


def load_yaml(path: str | Path, *, display: str | None = None) -> LoadedYaml:
    """Compose the recipe at ``path`` into nodes with positions; :class:`RecipeError` for unreadable files.

    ``display`` is the file name used in messages (default: ``path`` as given).
    """
    p = Path(path)
    file = display if display is not None else str(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise RecipeError([Issue(Where(file), "the recipe file does not exist.")]) from None
    except IsADirectoryError:
        raise RecipeError([Issue(Where(file), "is a folder; give the recipe's .yaml file.")]) from None
    except OSError as exc:
        raise RecipeError([Issue(Where(file), f"cannot be read: {exc.strerror or exc}.")]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RecipeError([Issue(Where(file), f"is not UTF-8 text (byte {exc.start}); a recipe is a YAML text "
                                              "file.")]) from None
    loader = yaml.SafeLoader(text)
    loader.name = file
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as exc:
        raise RecipeError([_yaml_error(exc, file)]) from None
    finally:
        loader.dispose()
    if root is None:
        raise RecipeError([Issue(Where(file), "the recipe is empty; it must be a mapping that starts with "
                                              "'version: 1'.")])
    if not isinstance(root, yaml.MappingNode):
        raise RecipeError([Issue(where_of(root, file), "a recipe is a YAML mapping (keys such as version, inputs, "
                                                       f"steps), not a {_kind(root)}.")])
    problems: list[Issue] = []
    _check_merge_keys(root, file, problems, set())
    if problems:
        raise RecipeError(problems)
    return LoadedYaml(root, file, p, text)


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    if isinstance(node, yaml.SequenceNode):
        return "list"
    return {STR: "text", INT: "integer", FLOAT: "number", BOOL: "boolean", NULL: "null (empty value)"}.get(
        node.tag, "value")


def _check_merge_keys(node: yaml.Node, file: str, problems: list[Issue], seen: set[int]) -> None:
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if k.tag == MERGE:
                problems.append(Issue(where_of(k, file), "YAML merge keys ('<<') are not supported in recipes; "
                                                         "write the keys out (anchors and aliases are fine)."))
            _check_merge_keys(v, file, problems, seen)
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            _check_merge_keys(v, file, problems, seen)


def to_python(node: yaml.Node | None) -> Any:
    """The plain Python value of a node (after substitution): dicts, lists, str, int, float, bool, None."""
    if node is None:
        return None
    if isinstance(node, yaml.MappingNode):
        return {to_python(k): to_python(v) for k, v in node.value}
    if isinstance(node, yaml.SequenceNode):
        return [to_python(v) for v in node.value]
    return _scalar(node)


_CONSTRUCTOR = yaml.constructor.SafeConstructor()  # only its scalar constructors are used


def _scalar(node: yaml.ScalarNode) -> Any:
    if node.tag == STR:
        return node.value
    if node.tag == NULL:
        return None
    if node.tag == BOOL:
        return _CONSTRUCTOR.construct_yaml_bool(node)
    if node.tag == INT:
        return _CONSTRUCTOR.construct_yaml_int(node)
    if node.tag == FLOAT:
        return _CONSTRUCTOR.construct_yaml_float(node)
    return node.value


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    """``["name=value", ...]`` from ``--set`` into a dict; :class:`PlanError` for malformed items."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise PlanError(f"--set {item!r}: expected NAME=VALUE (e.g. --set models=./demo).")
        if not VAR_NAME.match(name):
            raise PlanError(f"--set {item!r}: {name!r} is not a variable name (letters, digits and _, not starting "
                            "with a digit).")
        if name in out:
            raise PlanError(f"--set {name}=... is given twice ({out[name]!r} and {value!r}); give each variable once.")
        out[name] = value
    return out


def _resolver() -> yaml.resolver.Resolver:
    return yaml.resolver.Resolver()


def substitute(node: yaml.Node, values: Mapping[str, str], file: str, problems: list[Issue],
               used: set[str] | None = None, skip: yaml.Node | None = None) -> yaml.Node:
    """A copy of ``node`` with ``${name}`` replaced in every string scalar (keys excepted); see the module doc.

    Unknown names are reported in ``problems`` (the scalar is kept unchanged); ``used`` collects the names
    that were referenced; the subtree ``skip`` (the ``vars`` mapping) is left as it is.
    """
    resolver = _resolver()
    memo: dict[int, yaml.Node] = {}

    def walk(n: yaml.Node) -> yaml.Node:
        if n is skip:
            return n
        if id(n) in memo:
            return memo[id(n)]
        if isinstance(n, yaml.MappingNode):
            out: yaml.Node = yaml.MappingNode(n.tag, [], n.start_mark, n.end_mark, n.flow_style)
            memo[id(n)] = out
            out.value = [(k, walk(v)) for k, v in n.value]
            return out
        if isinstance(n, yaml.SequenceNode):
            out = yaml.SequenceNode(n.tag, [], n.start_mark, n.end_mark, n.flow_style)
            memo[id(n)] = out
            out.value = [walk(v) for v in n.value]
            return out
        if n.tag != STR or "$" not in n.value:
            return n
        text = _replace(n, values, file, problems, used)
        if text == n.value:
            return n
        tag = STR if n.style else resolver.resolve(yaml.ScalarNode, text, (True, False))
        new = yaml.ScalarNode(tag, text, n.start_mark, n.end_mark, n.style)
        new.substituted = True  # typed by the schema: see is_substituted
        memo[id(n)] = new
        return new

    return walk(node)


def is_substituted(node: yaml.Node) -> bool:
    """True for a scalar whose text came from ``${...}`` substitution.

    Such a scalar is typed by the schema: where a number is expected, ``"${w}"`` (quoted, e.g. inside a flow
    mapping ``{weight: "${w}"}``, where YAML needs quotes around ``${``) with ``w=0.5`` is the number 0.5, and
    where text is expected, ``${v}`` with ``v=2024`` is the text ``"2024"``.
    """
    return bool(getattr(node, "substituted", False))


def retyped(node: yaml.ScalarNode) -> yaml.ScalarNode:
    """A substituted scalar with the tag YAML would give its text unquoted (other nodes unchanged)."""
    if not is_substituted(node) or node.tag != STR:
        return node
    tag = _resolver().resolve(yaml.ScalarNode, node.value, (True, False))
    return yaml.ScalarNode(tag, node.value, node.start_mark, node.end_mark)


def _replace(node: yaml.ScalarNode, values: Mapping[str, str], file: str, problems: list[Issue],
             used: set[str] | None) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        name = m.group(1).strip()
        if name in values:
            if used is not None:
                used.add(name)
            return values[name]
        where = where_of(node, file)
        if not VAR_NAME.match(name):
            problems.append(Issue(where, f"'${{{m.group(1)}}}' is not a variable reference: a name is letters, "
                                         "digits and _ (write '$${' for a literal '${')."))
        else:
            near = difflib.get_close_matches(name, list(values), n=1, cutoff=0.6)
            hint = f" Did you mean '${{{near[0]}}}'?" if near else ""
            known = ", ".join(sorted(values)) or "none"
            problems.append(Issue(where, f"unknown variable '${{{name}}}'; declare it under 'vars:' (declared: "
                                         f"{known}).{hint}"))
        return m.group(0)

    return _REF.sub(one, node.value)
