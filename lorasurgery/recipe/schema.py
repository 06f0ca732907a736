"""The recipe schema, as data, and its validation with positions and nearest-key suggestions.

The schema is a tree of small type objects (:class:`Struct`, :class:`Field`, :class:`Choice`, ...). The same
data drives three things, so they cannot drift apart:

* :func:`check_recipe` validates a composed YAML file (:mod:`.loader`) and returns a :class:`Recipe` with
  every default filled in, reporting *every* problem as ``file:line:column: message`` (unknown keys with the
  nearest valid key, wrong types with what is expected, unknown names, forward references and cycles
  between steps, conflicting outputs);
* :func:`json_schema` exports a JSON Schema (draft 2020-12) of the recipe after variable substitution
  (``lorasurgery validate --print-schema``; ``schema.json`` beside this module is generated from it);
* :func:`reference_markdown` writes the schema reference of the README (every key, type, default).

Header-dependent checks (architectures, block lists, ranks, pins) are done by :mod:`.plan`.
"""
from __future__ import annotations

import abc
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from .loader import (
    BOOL,
    FLOAT,
    INT,
    NULL,
    STR,
    Issue,
    LoadedYaml,
    RecipeError,
    Where,
    _kind,
    is_substituted,
    load_yaml,
    retyped,
    substitute,
    to_python,
    where_of,
)

__all__ = [
    "FORMAT_VERSION",
    "OPS",
    "RECIPE",
    "STEP_TYPES",
    "BlockSpec",
    "Recipe",
    "check_recipe",
    "json_schema",
    "load_recipe",
    "reference_markdown",
]

#: The only recipe format version this lorasurgery reads (``version: 1``).
FORMAT_VERSION = 1

# Kept equal to the library's constants by the tests (importing them here would pull in torch).
ARCHS = ("sd1", "sd2", "sdxl", "sd3", "flux")
FORMATS = ("kohya", "peft")
RANK_METHODS = ("fixed", "sv_ratio", "sv_fro", "sv_cumulative")
SVD_MODES = ("auto", "exact", "randomized")
LORA_DTYPES = ("fp16", "bf16", "fp32")
BAKE_DTYPES = ("keep", "fp16", "bf16", "fp32")

#: Input names and step ids: a letter, then letters, digits, ``_``, ``-`` or ``.`` (they name temporary files).
NAME_RE = r"^[A-Za-z][A-Za-z0-9_.-]*$"
_SHA256 = r"^[0-9a-fA-F]{64}$"
#: Metadata keys a recipe may not set (the tool writes them).
RESERVED_METADATA = ("lorasurgery.", "sshs_")

INVALID = object()
MISSING = object()

KeyPath = tuple  # a location in the recipe: ("steps", 0, "loras", 1, "weight")


# --------------------------------------------------------------------------------------------------
# checking context
# --------------------------------------------------------------------------------------------------


class Checker:
    """Collects issues and the position of every validated value."""

    def __init__(self, file: str):
        self.file = file
        self.issues: list[Issue] = []
        self.marks: dict[KeyPath, Where] = {}
        self.key_marks: dict[KeyPath, Where] = {}

    def at(self, node: yaml.Node | None) -> Where:
        return where_of(node, self.file)

    def error(self, node: yaml.Node | Where | None, message: str) -> object:
        where = node if isinstance(node, Where) else self.at(node)
        self.issues.append(Issue(where, message))
        return INVALID

    def warn(self, node: yaml.Node | Where | None, message: str) -> None:
        where = node if isinstance(node, Where) else self.at(node)
        self.issues.append(Issue(where, message, "warning"))


def _show(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        v = node.value
        return f"{_kind(node)} {v!r}" if node.tag != NULL else "an empty value (null)"
    return f"a {_kind(node)}"


def _dotted(path: KeyPath) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "recipe"


# --------------------------------------------------------------------------------------------------
# types
# --------------------------------------------------------------------------------------------------


class Type(abc.ABC):
    """A schema type: validates a node, describes itself for docs and JSON Schema."""

    @abc.abstractmethod
    def check(self, node: yaml.Node, c: Checker, path: KeyPath) -> Any:
        """The validated Python value of ``node``, or INVALID after reporting the problem to ``c``."""

    @abc.abstractmethod
    def describe(self) -> str:
        """A short description for messages and the reference ("integer ≥ 1")."""

    @abc.abstractmethod
    def json(self) -> dict[str, Any]:
        """The JSON Schema of this type."""


def _scalar(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode)


@dataclass(frozen=True)
class Str(Type):
    pattern: str | None = None
    what: str = "text"
    nonempty: bool = True

    def check(self, node, c, path):
        if _scalar(node) and is_substituted(node):
            node = yaml.ScalarNode(STR, node.value, node.start_mark, node.end_mark)
        if not _scalar(node) or node.tag != STR:
            hint = " (quote it to make it text)" if _scalar(node) and node.tag in (INT, FLOAT, BOOL) else ""
            return c.error(node, f"{_dotted(path)}: expected {self.what}, got {_show(node)}{hint}.")
        if self.nonempty and not node.value.strip():
            return c.error(node, f"{_dotted(path)}: expected {self.what}, got an empty string.")
        if self.pattern and not re.match(self.pattern, node.value):
            return c.error(node, f"{_dotted(path)}: {node.value!r} is not {self.what}.")
        return node.value

    def describe(self):
        return self.what

    def json(self):
        out: dict[str, Any] = {"type": "string"}
        if self.pattern:
            out["pattern"] = self.pattern
        elif self.nonempty:
            out["minLength"] = 1
        return out


@dataclass(frozen=True)
class Int(Type):
    minimum: int | None = None
    maximum: int | None = None

    def check(self, node, c, path):
        if _scalar(node):
            node = retyped(node)
        if not _scalar(node) or node.tag != INT:
            extra = ""
            if _scalar(node) and node.tag == FLOAT:
                extra = " (a whole number is needed)"
            elif _scalar(node) and node.tag == STR and re.fullmatch(r"\s*[-+]?\d+\s*", node.value):
                extra = " (it is quoted; remove the quotes)"
            return c.error(node, f"{_dotted(path)}: expected {self.describe()}, got {_show(node)}{extra}.")
        v = to_python(node)
        if (self.minimum is not None and v < self.minimum) or (self.maximum is not None and v > self.maximum):
            return c.error(node, f"{_dotted(path)}: {v} is out of range; expected {self.describe()}.")
        return v

    def describe(self):
        if self.minimum is not None and self.maximum is not None:
            return f"integer {self.minimum}" if self.minimum == self.maximum else \
                f"integer in [{self.minimum}, {self.maximum}]"
        if self.minimum is not None:
            return f"integer ≥ {self.minimum}"
        return "integer"

    def json(self):
        out: dict[str, Any] = {"type": "integer"}
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        return out


@dataclass(frozen=True)
class Version(Type):
    """The format version: an integer this lorasurgery reads."""

    def check(self, node, c, path):
        got = Int().check(node, c, path)
        if got is INVALID:
            return INVALID
        if got != FORMAT_VERSION:
            return c.error(node, f"recipe format version {got} is not supported; this lorasurgery reads "
                                 f"version {FORMAT_VERSION} (write 'version: {FORMAT_VERSION}').")
        return got

    def describe(self):
        return f"integer {FORMAT_VERSION}"

    def json(self):
        return {"const": FORMAT_VERSION}


@dataclass(frozen=True)
class Float(Type):
    minimum: float | None = None
    exclusive_minimum: float | None = None
    maximum: float | None = None

    def check(self, node, c, path):
        if _scalar(node):
            node = retyped(node)
        if not _scalar(node) or node.tag not in (INT, FLOAT):
            extra = " (it is quoted; remove the quotes)" if _scalar(node) and node.tag == STR and \
                _is_number(node.value) else ""
            return c.error(node, f"{_dotted(path)}: expected {self.describe()}, got {_show(node)}{extra}.")
        v = float(to_python(node))
        if not math.isfinite(v):
            return c.error(node, f"{_dotted(path)}: expected a finite number, got {node.value}.")
        if (self.minimum is not None and v < self.minimum) or (self.maximum is not None and v > self.maximum) or \
                (self.exclusive_minimum is not None and v <= self.exclusive_minimum):
            return c.error(node, f"{_dotted(path)}: {node.value} is out of range; expected {self.describe()}.")
        return v

    def describe(self):
        lo = (f"> {self.exclusive_minimum:g}" if self.exclusive_minimum is not None else
              f"≥ {self.minimum:g}" if self.minimum is not None else "")
        hi = f"≤ {self.maximum:g}" if self.maximum is not None else ""
        rng = " and ".join(x for x in (lo, hi) if x)
        return f"number {rng}".strip() if rng else "number (may be negative)"

    def json(self):
        out: dict[str, Any] = {"type": "number"}
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.exclusive_minimum is not None:
            out["exclusiveMinimum"] = self.exclusive_minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Bool(Type):
    def check(self, node, c, path):
        if _scalar(node):
            node = retyped(node)
        if not _scalar(node) or node.tag != BOOL:
            return c.error(node, f"{_dotted(path)}: expected true or false, got {_show(node)}.")
        return to_python(node)

    def describe(self):
        return "boolean"

    def json(self):
        return {"type": "boolean"}


@dataclass(frozen=True)
class Choice(Type):
    values: tuple[str, ...]
    what: str = "value"

    def check(self, node, c, path):
        if _scalar(node) and is_substituted(node):
            node = yaml.ScalarNode(STR, node.value, node.start_mark, node.end_mark)
        if not _scalar(node) or node.tag != STR:
            return c.error(node, f"{_dotted(path)}: expected one of {', '.join(self.values)}, got {_show(node)}.")
        v = node.value.strip()
        if v in self.values:
            return v
        folded = [x for x in self.values if x.lower() == v.lower()]
        near = folded or difflib.get_close_matches(v.lower(), self.values, n=1, cutoff=0.5)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        return c.error(node, f"{_dotted(path)}: unknown {self.what} {v!r}; expected one of "
                             f"{', '.join(self.values)}.{hint}")

    def describe(self):
        return " \\| ".join(f"`{v}`" for v in self.values)

    def json(self):
        return {"type": "string", "enum": list(self.values)}


@dataclass(frozen=True)
class Scalar(Type):
    """A variable's default value: text, number or boolean."""

    def check(self, node, c, path):
        if not _scalar(node) or node.tag == NULL:
            return c.error(node, f"{_dotted(path)}: a variable's default is a single value (text, number or "
                                 f"boolean), got {_show(node)}.")
        if node.tag == STR and re.search(r"\$\{", node.value.replace("$${", "")):
            return c.error(node, f"{_dotted(path)}: a variable's value cannot use other variables "
                                 "(${...}); write the value out.")
        return to_python(node)

    def describe(self):
        return "text, number or boolean"

    def json(self):
        return {"type": ["string", "number", "boolean"]}


@dataclass(frozen=True)
class ListOf(Type):
    item: Type
    min_items: int = 0

    def check(self, node, c, path):
        if not isinstance(node, yaml.SequenceNode):
            return c.error(node, f"{_dotted(path)}: expected a list of {self.item.describe()}, got {_show(node)}.")
        if len(node.value) < self.min_items:
            return c.error(node, f"{_dotted(path)}: needs at least {self.min_items} item"
                                 f"{'s' if self.min_items > 1 else ''}.")
        out = []
        ok = True
        for i, item in enumerate(node.value):
            c.marks[path + (i,)] = c.at(item)
            v = self.item.check(item, c, path + (i,))
            ok &= v is not INVALID
            out.append(v)
        return out if ok else INVALID

    def describe(self):
        return f"list of {self.item.describe()}"

    def json(self):
        out: dict[str, Any] = {"type": "array", "items": self.item.json()}
        if self.min_items:
            out["minItems"] = self.min_items
        return out


def _mapping_items(node: yaml.MappingNode, c: Checker, path: KeyPath) -> list[tuple[str, yaml.Node, yaml.Node]] | None:
    """The (key text, key node, value node) items of a mapping; duplicate and non-text keys are errors."""
    seen: dict[str, yaml.Node] = {}
    items = []
    ok = True
    for k, v in node.value:
        if not _scalar(k) or k.tag not in (STR, INT):
            c.error(k, f"{_dotted(path)}: keys must be plain names, got {_show(k)}.")
            ok = False
            continue
        key = str(k.value)
        if key in seen:
            c.error(k, f"{_dotted(path)}: key {key!r} appears twice (first at line {seen[key].start_mark.line + 1}); "
                       "YAML would silently keep only the last one.")
            ok = False
            continue
        seen[key] = k
        items.append((key, k, v))
    return items if ok else None


@dataclass(frozen=True)
class MapOf(Type):
    """A mapping from names to values of one type (inputs, blocks, vars, metadata)."""

    value: Type
    key_pattern: str = NAME_RE
    key_what: str = "a name (a letter, then letters, digits, '_', '-' or '.')"
    min_items: int = 0
    value_what: str = ""

    def check(self, node, c, path):
        if _scalar(node) and node.tag == NULL:
            items: list = []
        elif not isinstance(node, yaml.MappingNode):
            return c.error(node, f"{_dotted(path)}: expected a mapping of names to {self.describe_value()}, "
                                 f"got {_show(node)}.")
        else:
            got = _mapping_items(node, c, path)
            if got is None:
                return INVALID
            items = got
        if len(items) < self.min_items:
            return c.error(node, f"{_dotted(path)}: needs at least {self.min_items} entr"
                                 f"{'ies' if self.min_items > 1 else 'y'}.")
        out: dict[str, Any] = {}
        ok = True
        for key, k, v in items:
            if not re.match(self.key_pattern, key):
                c.error(k, f"{_dotted(path)}: {key!r} is not a valid name; expected {self.key_what}.")
                ok = False
                continue
            c.key_marks[path + (key,)] = c.at(k)
            c.marks[path + (key,)] = c.at(v)
            val = self.value.check(v, c, path + (key,))
            ok &= val is not INVALID
            out[key] = val
        return out if ok else INVALID

    def describe_value(self) -> str:
        return self.value_what or self.value.describe()

    def describe(self):
        return f"mapping of names to {self.describe_value()}"

    def json(self):
        return {"type": "object", "propertyNames": {"pattern": self.key_pattern},
                "additionalProperties": self.value.json(), **({"minProperties": self.min_items}
                                                             if self.min_items else {})}


@dataclass(frozen=True)
class Field:
    """One key of a :class:`Struct`."""

    name: str
    type: Type
    doc: str
    required: bool = False
    default: Any = MISSING  # MISSING and not required: absent stays absent
    nullable: bool = False
    default_doc: str = ""  # how a null default is resolved (shown in the reference)

    def default_text(self) -> str:
        if self.required:
            return "required"
        if self.default is MISSING:
            return "—"
        if self.default is None:
            return f"null ({self.default_doc})" if self.default_doc else "null"
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, (dict, list)) and not self.default:
            return "{}" if isinstance(self.default, dict) else "[]"
        return f"`{self.default}`"


@dataclass(frozen=True)
class Struct(Type):
    name: str
    fields: tuple[Field, ...]
    doc: str = ""
    # keys that are valid elsewhere, with a hint shown when they appear here
    elsewhere: Mapping[str, str] = field(default_factory=dict)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def check(self, node, c, path):
        if not isinstance(node, yaml.MappingNode):
            return c.error(node, f"{_dotted(path)}: expected {self.describe()} (a mapping with "
                                 f"{', '.join(self.names)}), got {_show(node)}.")
        items = _mapping_items(node, c, path)
        if items is None:
            return INVALID
        return self.check_items(node, items, c, path)

    def check_items(self, node, items, c, path, *, context: str = ""):
        given = {key: (k, v) for key, k, v in items}
        ok = True
        for key, k, _ in items:
            if key not in self.names:
                ok = False
                c.error(k, self.unknown_key_message(key, path, context))
        out: dict[str, Any] = {}
        for f in self.fields:
            if f.name not in given:
                if f.required:
                    c.error(node, f"{_dotted(path)}: missing required key '{f.name}' ({_first_sentence(f.doc)}).")
                    ok = False
                elif f.default is not MISSING:
                    out[f.name] = _copy(f.default)
                continue
            k, v = given[f.name]
            c.key_marks[path + (f.name,)] = c.at(k)
            c.marks[path + (f.name,)] = c.at(v)
            if f.nullable and _scalar(v) and v.tag == NULL:
                out[f.name] = None
                continue
            val = f.type.check(v, c, path + (f.name,))
            ok &= val is not INVALID
            out[f.name] = val
        return out if ok else INVALID

    def unknown_key_message(self, key: str, path: KeyPath, context: str = "") -> str:
        where = context or f"{_dotted(path)}"
        near = difflib.get_close_matches(key, self.names, n=1, cutoff=0.6) or \
            difflib.get_close_matches(key.lower().replace("-", "_"), self.names, n=1, cutoff=0.6)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        extra = self.elsewhere.get(key, "")
        if extra:
            extra = f" ({extra})"
        return f"{where}: unknown key '{key}'{extra}.{hint} Valid keys: {', '.join(self.names)}."

    def describe(self):
        return f"{self.name}"

    def json(self):
        props = {}
        for f in self.fields:
            schema = f.type.json()
            if f.nullable:
                schema = {"anyOf": [schema, {"type": "null"}]}
            schema = dict(schema)
            schema["description"] = f.doc
            if f.default is not MISSING and not f.required:
                schema["default"] = f.default
            props[f.name] = schema
        out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
        req = [f.name for f in self.fields if f.required]
        if req:
            out["required"] = req
        if self.doc:
            out["description"] = self.doc
        return out


def _copy(v: Any) -> Any:
    if isinstance(v, dict):
        return dict(v)
    if isinstance(v, list):
        return list(v)
    return v


def _first_sentence(doc: str) -> str:
    s = doc.split(". ")[0].rstrip(".")
    return s[0].lower() + s[1:] if s else s


# ---- block specs and LoRA references --------------------------------------------------------------


@dataclass(frozen=True)
class BlockSpec:
    """A block-weight spec as written (node kept for positions) or the name of a shared spec."""

    node: yaml.Node
    value: Any  # plain Python form

    @property
    def name(self) -> str | None:
        """The text of a one-word string spec (a shared spec's name or a preset)."""
        if isinstance(self.value, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", self.value.strip()):
            return self.value.strip()
        return None


@dataclass(frozen=True)
class BlockSpecType(Type):
    def check(self, node, c, path):
        if _scalar(node) and node.tag == NULL:
            return None
        if _scalar(node) and node.tag not in (STR,):
            return c.error(node, f"{_dotted(path)}: a block-weight spec is the name of a 'blocks:' entry or a "
                                 "preset, 'ID=VALUE' text, a list of values or a mapping; got "
                                 f"{_show(node)}.")
        return BlockSpec(node, to_python(node))

    def describe(self):
        return "block spec"

    def json(self):
        value = {"anyOf": [{"type": "number"}, {"type": "string"}]}
        return {"anyOf": [
            {"type": "string", "description": "name of a 'blocks:' entry, a preset (optionally with ID=VALUE "
                                              "overrides), a comma-separated list, or ID=VALUE pairs"},
            {"type": "array", "items": value, "description": "one value per block of a layout of the architecture"},
            {"type": "object", "description": "ID: value pairs, or {preset, layout, values, overrides}",
             "additionalProperties": {"anyOf": [value["anyOf"][0], value["anyOf"][1], {"type": "array"},
                                                {"type": "object"}]}},
        ]}


LORA_ITEM = Struct("LoRA item", (
    Field("input", Str(NAME_RE, "the name of an input or an earlier step"),
          "The LoRA: an input name or the id of an earlier step that produced a LoRA.", required=True),
    Field("weight", Float(), "Strength of this LoRA (multiplies ΔW; negative subtracts).", default=1.0),
    Field("blocks", BlockSpecType(), "Block weights of this LoRA (overrides the step's `blocks`).",
          default=None, nullable=True, default_doc="the step's `blocks`, else every block at 1"),
), doc="A LoRA with its weight and block weights; a plain name is short for {input: NAME}.")


@dataclass(frozen=True)
class LoraRefType(Type):
    """A LoRA reference: a name, or {input, weight, blocks}."""

    def check(self, node, c, path):
        if _scalar(node) and node.tag == STR:
            got = Str(NAME_RE, "the name of an input or an earlier step").check(node, c, path)
            if got is INVALID:
                return INVALID
            return {"input": got, "weight": 1.0, "blocks": None}
        if isinstance(node, yaml.MappingNode):
            c.marks[path + ("input",)] = c.at(node)
            return LORA_ITEM.check(node, c, path)
        return c.error(node, f"{_dotted(path)}: expected a LoRA: a name, or {{input: NAME, weight: W, blocks: "
                             f"SPEC}}; got {_show(node)}.")

    def describe(self):
        return "LoRA item"

    def json(self):
        return {"anyOf": [{"type": "string", "pattern": NAME_RE}, LORA_ITEM.json()]}


@dataclass(frozen=True)
class RefType(Type):
    """The name of an input or an earlier step (checked against the recipe after the schema)."""

    role: str

    def check(self, node, c, path):
        return Str(NAME_RE, f"the name of an input or an earlier step ({self.role})").check(node, c, path)

    def describe(self):
        return f"name ({self.role})"

    def json(self):
        return {"type": "string", "pattern": NAME_RE}


# ---- outputs -------------------------------------------------------------------------------------------

_METADATA = MapOf(Str(what="text", nonempty=False), key_pattern=r"^[^\s]+$",
                  key_what="a metadata key without spaces", value_what="text")

_OUTPUT_FIELDS = (
    Field("path", Str(what="a file path"), "Output file, relative to the recipe's folder (missing folders are "
          "created). Must end in `.safetensors`.", required=True),
    Field("title", Str(what="text"), "Title written to `modelspec.title`.", default=None, nullable=True,
          default_doc="the file name without `.safetensors`"),
    Field("format", Choice(FORMATS, "format"), "LoRA key format; sets the producing step's `format` (LoRA steps "
          "only).", default=None, nullable=True, default_doc="the step's format"),
    Field("dtype", Choice(BAKE_DTYPES, "dtype"), "Output dtype; sets the producing step's `dtype`.",
          default=None, nullable=True, default_doc="the step's dtype"),
    Field("metadata", _METADATA, "Extra `__metadata__` entries (text values), written last; keys starting "
          "with `lorasurgery.` or `sshs_` are reserved.", default={}),
)

OUTPUT = Struct("output", (Field("from", RefType("the step whose result is written"),
                                 "The id of the step whose result this output writes.", required=True),)
                + _OUTPUT_FIELDS, doc="A file written from a step's result.")
STEP_OUTPUT = Struct("step output", _OUTPUT_FIELDS,
                     doc="Where a step's result is written; a plain path is short for {path: PATH}.",
                     elsewhere={"from": "a step's own output needs no 'from'"})


@dataclass(frozen=True)
class StepOutputType(Type):
    def check(self, node, c, path):
        if _scalar(node) and node.tag == STR:
            got = Str(what="a file path").check(node, c, path)
            if got is INVALID:
                return INVALID
            return {"path": got, "title": None, "format": None, "dtype": None, "metadata": {}}
        return STEP_OUTPUT.check(node, c, path)

    def describe(self):
        return "path or step output"

    def json(self):
        return {"anyOf": [{"type": "string", "minLength": 1}, STEP_OUTPUT.json()]}


# ---- steps ------------------------------------------------------------------------------------------------

_ID = Field("id", Str(NAME_RE, "a step id (a letter, then letters, digits, '_', '-' or '.')"),
            "Name of the step; later steps and outputs refer to its result by it.", required=True)
_OUTPUT = Field("output", StepOutputType(), "Write this step's result to a file (same keys as an `outputs` entry, "
                "without `from`). A step without an output is an intermediate, kept in a temporary file.",
                default=None, nullable=True, default_doc="intermediate only")


def _op(name: str) -> Field:
    return Field("op", Choice((name,), "operation"), f"`{name}`.", required=True)


def _rank_fields(*, rank_default: Any, what: str) -> tuple[Field, ...]:
    return (
        Field("rank", Int(1), f"Rank of linear and 1x1 modules ({what}); the cap for dynamic rank methods.",
              default=rank_default, nullable=rank_default is None,
              default_doc="none" if rank_default is None else ""),
        Field("conv_rank", Int(1), "Rank (cap) of 3x3 convolutions.", default=None, nullable=True,
              default_doc="`rank`"),
        Field("rank_method", Choice(RANK_METHODS, "rank method"), "How each module's rank is chosen: `fixed` "
              "(= `rank`), `sv_ratio`, `sv_fro`, `sv_cumulative` (with `rank_param`).", default="fixed"),
        Field("rank_param", Float(exclusive_minimum=0), "Parameter of a dynamic rank method: `sv_ratio` > 1; "
              "`sv_fro`, `sv_cumulative` in (0, 1].", default=None, nullable=True, default_doc="none"),
        Field("svd", Choice(SVD_MODES, "SVD back-end"), "SVD back-end: `auto`, `exact` or `randomized` "
              "(seeded by the recipe's `seed`).", default="auto"),
    )


_FORMAT = Field("format", Choice(FORMATS, "format"), "LoRA key format: `kohya` or `peft`.", default=None,
                nullable=True, default_doc="the architecture's default: kohya, peft for SD3")
_LORA_DTYPE = Field("dtype", Choice(LORA_DTYPES, "dtype"), "Output dtype: `fp16`, `bf16` or `fp32`.", default=None,
                    nullable=True, default_doc="the widest dtype of the inputs (fp32 if they mix fp16 and bf16)")
_DROP = Field("drop_unsupported", Bool(), "Leave out (and list) modules the output format cannot name, instead "
              "of failing.", default=False)
_STEP_BLOCKS = Field("blocks", BlockSpecType(), "Block weights for every LoRA of the step without its own.",
                     default=None, nullable=True, default_doc="every block at 1")
_METHOD = Field("method", Choice(("concat", "svd"), "method"), "`concat`: exact, ranks add up; `svd`: optimal "
                "truncation of the sum to `rank` or a rank rule (needs `rank` or `rank_method` + `rank_param`).",
                default="concat")

EXTRACT = Struct("extract step", (
    _ID, _op("extract"),
    Field("base", RefType("a checkpoint"), "The base checkpoint (input or earlier `bake` step).", required=True),
    Field("tuned", RefType("a checkpoint"), "The fine-tuned checkpoint.", required=True),
    Field("rank", Int(1), "Rank of linear and 1x1 modules; the cap for dynamic rank methods.", default=32),
    Field("conv_rank", Int(1), "Given: also extract LoCon targets (resnet convs, samplers) at this rank (cap).",
          default=None, nullable=True, default_doc="no conv modules"),
    Field("rank_method", Choice(RANK_METHODS, "rank method"), "How each module's rank is chosen: `fixed`, "
          "`sv_ratio`, `sv_fro`, `sv_cumulative`.", default="fixed"),
    Field("rank_param", Float(exclusive_minimum=0), "Parameter of a dynamic rank method.", default=None,
          nullable=True, default_doc="none"),
    Field("svd", Choice(SVD_MODES, "SVD back-end"), "SVD back-end: `auto`, `exact` or `randomized`.",
          default="auto"),
    Field("split", Choice(("up", "sqrt"), "split"), "Where the singular values go: `up` (kohya) or `sqrt`.",
          default="up"),
    Field("text_encoder", Bool(), "Extract text-encoder modules too.", default=True),
    Field("min_diff", Float(minimum=0), "Skip a module whose max |ΔW| is at most this.", default=0.0),
    Field("clamp_quantile", Float(exclusive_minimum=0.5, maximum=1), "Clamp the factors at this quantile (kohya: "
          "0.99).", default=None, nullable=True, default_doc="off"),
    Field("include_extra", Bool(), "Also extract targetable weights no LoRA trainer creates (conv_in, "
          "embeddings, ...).", default=False),
    Field("power_iters", Int(1), "Power iterations of the randomized SVD.", default=2),
    Field("blocks", BlockSpecType(), "Block weights: modules in a block at 0 are skipped, the others scaled.",
          default=None, nullable=True, default_doc="every block at 1"),
    _FORMAT,
    Field("dtype", Choice(LORA_DTYPES, "dtype"), "Output dtype.", default=None, nullable=True,
          default_doc="fp16 for SD1/SD2/SDXL, bf16 for SD3/FLUX"),
    _OUTPUT,
), doc="A LoRA holding the difference `tuned − base` of two checkpoints (truncated SVD per module).")

MERGE = Struct("merge step", (
    _ID, _op("merge"),
    Field("loras", ListOf(LoraRefType(), 1), "The LoRAs to add up: names or {input, weight, blocks}.",
          required=True),
    _STEP_BLOCKS, _METHOD,
    *_rank_fields(rank_default=None, what="svd method"),
    _FORMAT, _LORA_DTYPE, _DROP, _OUTPUT,
), doc="One LoRA holding Σ weight · block weight · ΔW of its LoRAs (no base checkpoint).")

SUBTRACT = Struct("subtract step", (
    _ID, _op("subtract"),
    Field("lora", LoraRefType(), "The LoRA B (with optional weight and blocks).", required=True),
    Field("minus", LoraRefType(), "The LoRA A that is subtracted.", required=True),
    _STEP_BLOCKS, _METHOD,
    *_rank_fields(rank_default=None, what="svd method"),
    _FORMAT, _LORA_DTYPE, _DROP, _OUTPUT,
), doc="The difference LoRA ΔB − ΔA.")

_INPUT_DTYPE = Field("dtype", Choice(LORA_DTYPES, "dtype"), "Output dtype: `fp16`, `bf16` or `fp32`.", default=None,
                     nullable=True, default_doc="the input's dtype (fp32 if it mixes fp16 and bf16)")

RESIZE = Struct("resize step", (
    _ID, _op("resize"),
    Field("lora", RefType("a LoRA"), "The LoRA to resize.", required=True),
    *_rank_fields(rank_default=None, what="required unless a dynamic rank_method is given"),
    Field("format", Choice(FORMATS, "format"), "LoRA key format.", default=None, nullable=True,
          default_doc="the input's convention"),
    _INPUT_DTYPE, _DROP, _OUTPUT,
), doc="The optimal lower-rank truncation of a LoRA, module by module.")

CONVERT = Struct("convert step", (
    _ID, _op("convert"),
    Field("lora", RefType("a LoRA"), "The LoRA to convert.", required=True),
    Field("format", Choice(FORMATS, "format"), "Target key format: `kohya` or `peft`.", required=True),
    _INPUT_DTYPE, _DROP, _OUTPUT,
), doc="The same ΔW in another key convention (and optionally dtype).")

BAKE = Struct("bake step", (
    _ID, _op("bake"),
    Field("base", RefType("a checkpoint"), "The base checkpoint (an input or an earlier bake).", required=True),
    Field("loras", ListOf(LoraRefType(), 1), "The LoRAs baked in: names or {input, weight, blocks}.",
          required=True),
    _STEP_BLOCKS,
    Field("dtype", Choice(BAKE_DTYPES, "dtype"), "`keep` (each tensor keeps the base's dtype), or `fp16`, "
          "`bf16`, `fp32` for every float tensor.", default="keep"),
    Field("allow_unmatched", Bool(), "Skip and count LoRA keys that match nothing in the base, instead of "
          "failing.", default=False),
    Field("allow_nonfinite", Bool(), "Skip and count LoRA modules with NaN/Inf, instead of failing.",
          default=False),
    _OUTPUT,
), doc="A checkpoint with LoRAs merged into its weights: W + Σ weight · block weight · ΔW.")

#: Step structures by operation name.
STEP_TYPES: Mapping[str, Struct] = {s.field("op").type.values[0]: s  # type: ignore[attr-defined]
                                    for s in (EXTRACT, MERGE, SUBTRACT, RESIZE, CONVERT, BAKE)}
OPS: tuple[str, ...] = tuple(STEP_TYPES)
#: Which fields of each step refer to other names, and what they must be.
REF_FIELDS: Mapping[str, tuple[str, ...]] = {
    "extract": ("base", "tuned"), "merge": ("loras",), "subtract": ("lora", "minus"),
    "resize": ("lora",), "convert": ("lora",), "bake": ("base", "loras"),
}


@dataclass(frozen=True)
class StepType(Type):
    def check(self, node, c, path):
        if not isinstance(node, yaml.MappingNode):
            return c.error(node, f"{_dotted(path)}: a step is a mapping with 'id', 'op' and the operation's "
                                 f"options, got {_show(node)}.")
        items = _mapping_items(node, c, path)
        if items is None:
            return INVALID
        ops = [(k, v) for key, k, v in items if key == "op"]
        if not ops:
            return c.error(node, f"{_dotted(path)}: the step has no 'op'; expected one of {', '.join(OPS)}.")
        op_node = ops[0][1]
        op = Choice(OPS, "operation").check(op_node, c, path + ("op",))
        if op is INVALID:
            return INVALID
        struct = STEP_TYPES[op]
        others = {name: s for name, s in STEP_TYPES.items() if name != op}
        ctx = f"{_dotted(path)} ({op})"
        # unknown keys get a hint naming the operations that have them
        hinted = Struct(struct.name, struct.fields, struct.doc, {
            key: f"an option of {', '.join(n for n, s in others.items() if key in s.names)}, not of {op}"
            for key in {f.name for s in others.values() for f in s.fields} if key not in struct.names})
        return hinted.check_items(node, items, c, path, context=ctx)

    def describe(self):
        return "step"

    def json(self):
        return {"oneOf": [s.json() for s in STEP_TYPES.values()]}


INPUT = Struct("input", (
    Field("path", Str(what="a file path"), "File or folder (safetensors file, sharded index, diffusers folder), "
          "relative to the recipe's folder.", required=True),
    Field("sha256", Str(_SHA256, "a SHA-256 (64 hex digits)"), "Pin: the file's SHA-256 (for a folder or shard "
          "set, the SHA-256 of its files' sorted hashes). Checked before any work; a mismatch is an error.",
          default=None, nullable=True, default_doc="not pinned"),
    Field("size", Int(0), "Pin: the size in bytes (a cheap check before hashing).", default=None, nullable=True,
          default_doc="not pinned"),
    Field("arch", Choice(ARCHS, "architecture"), "Expected architecture; the detected one must match.",
          default=None, nullable=True, default_doc="any"),
), doc="A named input file.")

RECIPE = Struct("recipe", (
    Field("version", Version(), f"Recipe format version; must be {FORMAT_VERSION}.",
          required=True),
    Field("description", Str(what="text", nonempty=False), "Free text (kept in the resolved recipe).",
          default=None, nullable=True),
    Field("seed", Int(0), "Seed of every random choice: randomized SVDs, block values `R` and `U`.", default=0),
    Field("vars", MapOf(Scalar(), key_pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                        key_what="a variable name (letters, digits, _)"),
          "Variables and their defaults, used as `${name}` in any text value; `--set name=value` overrides.",
          default={}),
    Field("inputs", MapOf(INPUT, min_items=1), "Named input files.", required=True),
    Field("blocks", MapOf(BlockSpecType(), value_what="block specs"), "Named block-weight specs, usable by name "
          "wherever a block spec goes.", default={}),
    Field("steps", ListOf(StepType(), 1), "The operations, run in order.", required=True),
    Field("outputs", ListOf(OUTPUT), "Files written from step results (a step's own `output` is the same).",
          default=[]),
), doc="A lorasurgery recipe (format version 1).", elsewhere={
    "lorasurgery": "the format version key is 'version: 1'",
    "models": "inputs are listed under 'inputs:' by name",
    "merge_method": "operations are steps: steps: [{id: NAME, op: merge, loras: [...]}]",
})


# --------------------------------------------------------------------------------------------------
# the validated recipe
# --------------------------------------------------------------------------------------------------


@dataclass
class Recipe:
    """A schema-valid recipe: plain data with every default filled in, and the position of every value.

    ``data`` mirrors the file (after variable substitution): ``version``, ``description``, ``seed``,
    ``vars`` (the values in effect), ``inputs``, ``blocks`` (:class:`BlockSpec` values), ``steps`` (each
    with every option of its operation) and ``outputs``: every output, those written inline on a step
    included (with ``from``), in file order; ``output_at[i]`` is the location path of ``outputs[i]``.
    """

    path: Path
    file: str
    data: dict[str, Any]
    marks: dict[KeyPath, Where]
    key_marks: dict[KeyPath, Where]
    output_at: list[KeyPath]
    warnings: list[Issue] = field(default_factory=list)
    sets: dict[str, str] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def steps(self) -> list[dict[str, Any]]:
        return self.data["steps"]

    @property
    def inputs(self) -> dict[str, dict[str, Any]]:
        return self.data["inputs"]

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return self.data["outputs"]

    @property
    def seed(self) -> int:
        return self.data["seed"]

    def where(self, *path: Any) -> Where:
        """Position of the value at ``path`` (or of its nearest enclosing value)."""
        p = tuple(path)
        while p:
            if p in self.marks:
                return self.marks[p]
            p = p[:-1]
        return Where(self.file, 1, 1)

    def key_where(self, *path: Any) -> Where:
        return self.key_marks.get(tuple(path)) or self.where(*path)

    def step_index(self, step_id: str) -> int:
        for i, s in enumerate(self.steps):
            if s["id"] == step_id:
                return i
        raise KeyError(step_id)


def load_recipe(path: str | Path, sets: Mapping[str, str] | None = None, *, display: str | None = None,
                ignore_unknown_sets: bool = False) -> Recipe:
    """Load and schema-check a recipe file; :class:`RecipeError` with every problem if it is invalid.

    ``sets`` are ``--set`` values; a name the recipe does not declare is an error unless
    ``ignore_unknown_sets`` (``validate`` with several recipes, which checks the names across all of them).
    """
    return check_recipe(load_yaml(path, display=display), sets or {}, ignore_unknown_sets=ignore_unknown_sets)


def _vars_node(root: yaml.MappingNode) -> yaml.Node | None:
    for k, v in root.value:
        if _scalar(k) and k.value == "vars":
            return v
    return None


def check_recipe(loaded: LoadedYaml, sets: Mapping[str, str], *, ignore_unknown_sets: bool = False) -> Recipe:
    """Validate a composed recipe (schema, names, references, outputs); see the module docstring."""
    c = Checker(loaded.file)
    # 1. variables: defaults, then --set overrides, then substitution everywhere but in 'vars' itself
    values: dict[str, str] = {}
    declared: dict[str, Any] = {}
    vnode = _vars_node(loaded.root)
    if vnode is not None:
        vc = Checker(loaded.file)
        got = RECIPE.field("vars").type.check(vnode, vc, ("vars",))
        if got is INVALID:  # everything else would be noise about unresolved ${...}
            raise RecipeError(vc.issues)
        declared = got
    for name, value in declared.items():
        values[name] = _var_text(value)
    sets = {k: v for k, v in sets.items() if k in declared or not ignore_unknown_sets}
    for name, value in sets.items():
        if name not in declared:
            near = difflib.get_close_matches(name, list(declared), n=1, cutoff=0.6)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            c.error(Where(loaded.file), f"--set {name}=...: the recipe declares no variable {name!r} "
                                        f"(declared: {', '.join(declared) or 'none'}).{hint}")
            continue
        values[name] = value
    used: set[str] = set()
    sub_issues: list[Issue] = []
    body = substitute(loaded.root, values, loaded.file, sub_issues, used, skip=vnode)
    c.issues.extend(sub_issues)
    # 2. the schema
    items = _mapping_items(body, c, ())
    data: Any = INVALID
    if items is not None:
        data = RECIPE.check_items(body, items, c, ())
    if data is INVALID or any(i.severity == "error" for i in c.issues):
        raise RecipeError(c.issues)
    data["vars"] = {name: (_typed(sets[name]) if name in sets else declared[name]) for name in declared}
    sets = {k: v for k, v in sets.items() if k in declared}
    for name in declared:
        if name not in used:
            c.warn(c.key_marks.get(("vars", name), Where(loaded.file)),
                   f"variable {name!r} is declared but never used as ${{{name}}}.")
    recipe = Recipe(Path(loaded.path), loaded.file, data, c.marks, c.key_marks, [], [], dict(sets))
    _check_names(recipe, c)
    if any(i.severity == "error" for i in c.issues):
        raise RecipeError(c.issues)
    recipe.warnings = [i for i in c.issues if i.severity == "warning"]
    return recipe


def _var_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _typed(text: str) -> Any:
    """A ``--set`` value as YAML would type it (for the resolved recipe's ``vars``)."""
    tag = yaml.resolver.Resolver().resolve(yaml.ScalarNode, text, (True, False))
    return to_python(yaml.ScalarNode(tag, text)) if tag != NULL else text


# --------------------------------------------------------------------------------------------------
# names, references, outputs
# --------------------------------------------------------------------------------------------------


def _step_refs(step: dict[str, Any]) -> list[tuple[tuple, str, str]]:
    """(location path suffix, referenced name, role) of every name a step uses."""
    out = []
    op = step["op"]
    for f in REF_FIELDS[op]:
        v = step[f]
        if f == "loras":
            for i, item in enumerate(v):
                out.append(((f, i, "input"), item["input"], "lora"))
        elif isinstance(v, dict):
            out.append(((f, "input"), v["input"], "lora"))
        else:
            role = "checkpoint" if f in ("base", "tuned") else "lora"
            out.append(((f,), v, role))
    return out


def _block_specs(step: dict[str, Any]) -> list[tuple[tuple, BlockSpec]]:
    out = []
    if isinstance(step.get("blocks"), BlockSpec):
        out.append((("blocks",), step["blocks"]))
    for f in ("loras", "lora", "minus"):
        v = step.get(f)
        items = v if isinstance(v, list) else [v] if isinstance(v, dict) else []
        for i, item in enumerate(items):
            if isinstance(item.get("blocks"), BlockSpec):
                out.append(((f, i, "blocks") if f == "loras" else (f, "blocks"), item["blocks"]))
    return out


#: What each operation produces.
PRODUCES = {"extract": "lora", "merge": "lora", "subtract": "lora", "resize": "lora", "convert": "lora",
            "bake": "checkpoint"}


def _check_names(r: Recipe, c: Checker) -> None:
    from ..blocks import BUILTIN_PRESETS

    inputs = r.inputs
    steps = r.steps
    # unique names across inputs and steps
    step_at: dict[str, int] = {}
    for i, s in enumerate(steps):
        sid = s["id"]
        if sid in inputs:
            c.error(r.where("steps", i, "id"), f"step id {sid!r} is also the name of an input (line "
                                               f"{r.key_where('inputs', sid).line}); names must be unique.")
        elif sid in step_at:
            c.error(r.where("steps", i, "id"), f"step id {sid!r} is used twice (first at line "
                                               f"{r.where('steps', step_at[sid], 'id').line}).")
        else:
            step_at[sid] = i
    for name in r.data["blocks"]:
        if name.upper() in {p.upper() for p in BUILTIN_PRESETS}:
            c.error(r.key_where("blocks", name), f"blocks entry {name!r} has the name of a built-in preset; "
                                                 "choose another name so that references are unambiguous.")
    # references: existing, earlier, right kind
    graph: dict[str, list[str]] = {s["id"]: [n for _, n, _ in _step_refs(s) if n in step_at] for s in steps}
    used_inputs: set[str] = set()
    consumed: set[str] = set()
    for i, s in enumerate(steps):
        for suffix, name, role in _step_refs(s):
            where = r.where("steps", i, *suffix)
            if name in inputs:
                used_inputs.add(name)
                continue
            j = step_at.get(name)
            if j is None:
                known = list(inputs) + [x["id"] for x in steps[:i]]
                near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                hint = f" Did you mean {near[0]!r}?" if near else ""
                c.error(where, f"{name!r} is neither an input nor an earlier step (known here: "
                               f"{', '.join(known) or 'none'}).{hint}")
                continue
            if j == i:
                c.error(where, f"step {name!r} refers to its own result; a step can only use inputs and earlier "
                               "steps.")
            elif j > i:
                cycle = _cycle(graph, steps, name, s["id"])
                extra = f" This forms a cycle: {' → '.join(cycle)}." if cycle else ""
                c.error(where, f"step {name!r} is defined later (line {r.where('steps', j).line}); steps run in "
                               f"file order and can only use inputs and earlier steps.{extra}")
            else:
                consumed.add(name)
                produced = PRODUCES[steps[j]["op"]]
                if produced != role:
                    c.error(where, f"{name!r} is the result of a {steps[j]['op']} step, i.e. a {produced}, but "
                                   f"{_dotted(suffix)} of a {s['op']} step needs a {role}.")
        for suffix, spec in _block_specs(s):
            _check_block_ref(r, c, spec, r.where("steps", i, *suffix))
    # outputs: inline ones join the list
    outputs: list[dict[str, Any]] = []
    output_at: list[KeyPath] = []
    for i, s in enumerate(steps):
        if s.get("output") is not None:
            outputs.append({"from": s["id"], **s["output"]})
            output_at.append(("steps", i, "output"))
    for j, o in enumerate(r.data["outputs"]):
        outputs.append(o)
        output_at.append(("outputs", j))
    for s in steps:
        s.pop("output", None)
    r.data["outputs"] = outputs
    r.output_at = output_at
    seen_paths: dict[str, KeyPath] = {}
    for o, at in zip(outputs, output_at):
        src = o["from"]
        if src not in step_at:
            if src in inputs:
                c.error(r.where(*at, "from") if at[0] == "outputs" else r.where(*at),
                        f"output 'from: {src}' names an input; outputs are written from steps (use a convert "
                        "step to re-write an input).")
            else:
                near = difflib.get_close_matches(src, list(step_at), n=1, cutoff=0.6)
                hint = f" Did you mean {near[0]!r}?" if near else ""
                c.error(r.where(*at, "from"), f"output 'from: {src}': no step has this id (steps: "
                                              f"{', '.join(step_at)}).{hint}")
            continue
        consumed.add(src)
        p = o["path"]
        if not p.endswith(".safetensors"):
            c.error(r.where(*at, "path") if at[0] == "outputs" else r.where(*at),
                    f"output path {p!r} must end in .safetensors.")
        key = str(Path(p))
        if key in seen_paths:
            c.error(r.where(*at), f"output path {p!r} is written twice (also at line "
                                  f"{r.where(*seen_paths[key]).line}).")
        seen_paths[key] = at
        for k in o["metadata"]:
            if k.startswith(RESERVED_METADATA):
                c.error(r.key_where(*at, "metadata", k), f"metadata key {k!r} is reserved: lorasurgery writes "
                                                         "lorasurgery.* provenance and sshs_* hashes itself.")
        _apply_output_settings(r, c, o, at, steps[step_at[src]], step_at[src])
    for name in inputs:
        if name not in used_inputs:
            c.warn(r.key_where("inputs", name), f"input {name!r} is not used by any step.")
    for i, s in enumerate(steps):
        if s["id"] not in consumed:
            c.warn(r.where("steps", i), f"the result of step {s['id']!r} is neither written to an output nor used "
                                        "by a later step; it is computed and discarded.")
    if not outputs:
        c.error(Where(r.file, 1, 1), "the recipe writes nothing: add an 'output:' to a step or an 'outputs:' list.")


def _cycle(graph: Mapping[str, list[str]], steps: Sequence[dict], start: str, back_to: str) -> list[str]:
    """A path start → ... → back_to in the reference graph (so back_to → start closes a cycle), if any."""
    stack = [(start, [start])]
    seen = set()
    while stack:
        node, path = stack.pop()
        if node == back_to:
            return [back_to] + path
        if node in seen:
            continue
        seen.add(node)
        for nxt in graph.get(node, []):
            stack.append((nxt, path + [nxt]))
    return []


def _check_block_ref(r: Recipe, c: Checker, spec: BlockSpec, where: Where) -> None:
    """A one-word spec must be a shared spec or a preset (presets are checked per architecture later)."""
    from ..blocks import BUILTIN_PRESETS

    name = spec.name
    if name is None or name in r.data["blocks"]:
        return
    if name.upper() in {p.upper() for p in BUILTIN_PRESETS}:
        return
    known = list(r.data["blocks"]) + list(BUILTIN_PRESETS)
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    c.error(where, f"block spec {name!r} is neither a 'blocks:' entry ({', '.join(r.data['blocks']) or 'none'}) nor "
                   f"a preset ({', '.join(BUILTIN_PRESETS)}).{hint}")


def _apply_output_settings(r: Recipe, c: Checker, o: dict[str, Any], at: KeyPath, step: dict[str, Any],
                           si: int) -> None:
    """An output's format/dtype set the producing step's; conflicting values are errors."""
    op = step["op"]
    for key in ("format", "dtype"):
        v = o.get(key)
        if v is None:
            continue
        where = r.where(*at, key)
        if key == "format" and op == "bake":
            c.error(where, "format applies to LoRA outputs; a bake step writes a checkpoint (in the base's "
                           "layout).")
            continue
        if key == "dtype" and op != "bake" and v not in LORA_DTYPES:
            c.error(where, f"dtype {v!r} is not a LoRA dtype; expected one of {', '.join(LORA_DTYPES)}.")
            continue
        have = step.get(key)
        if have is not None and have != v:
            c.error(where, f"{key} {v!r} conflicts with {key} {have!r} of step {step['id']!r} (line "
                           f"{r.where('steps', si, key).line}); a step's result has one {key}.")
            continue
        if op == "bake" and key == "dtype" and have == "keep" and ("steps", si, key) in r.marks:
            c.error(where, f"dtype {v!r} conflicts with dtype 'keep' of step {step['id']!r}.")
            continue
        step[key] = v


# --------------------------------------------------------------------------------------------------
# JSON Schema and reference text
# --------------------------------------------------------------------------------------------------


def json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a recipe after variable substitution."""
    out = RECIPE.json()
    out = {"$schema": "https://json-schema.org/draft/2020-12/schema",
           "$id": "urn:lorasurgery:recipe:1",
           "title": "lorasurgery recipe", **out}
    return out


def _type_text(f: Field) -> str:
    t = f.type
    text = t.describe()
    if isinstance(t, BlockSpecType):
        text = "block spec"
    elif isinstance(t, LoraRefType):
        text = "name or {input, weight, blocks}"
    elif isinstance(t, RefType) and f.name == "from":
        text = "step id"
    elif isinstance(t, RefType):
        text = f"name of an input or earlier step ({t.role})"
    elif isinstance(t, ListOf) and isinstance(t.item, LoraRefType):
        text = "list of LoRA items"
    elif isinstance(t, ListOf) and isinstance(t.item, StepType):
        text = "list of steps"
    elif isinstance(t, StepOutputType):
        text = "path or {path, title, format, dtype, metadata}"
    elif isinstance(t, MapOf):
        text = f"mapping name → {t.describe_value()}"
    elif isinstance(t, Struct):
        text = t.name
    return text + (" or null" if f.nullable and f.default is not None else "")


def _table(struct: Struct, skip: Iterable[str] = ()) -> list[str]:
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for f in struct.fields:
        if f.name in skip:
            continue
        doc = f.doc.replace("|", "\\|")
        rows.append(f"| `{f.name}` | {_type_text(f)} | {f.default_text()} | {doc} |")
    return rows


def reference_markdown() -> str:
    """The schema reference for the README: one table per structure, generated from the schema data."""
    out: list[str] = ["**Top level**", ""] + _table(RECIPE) + ["", "**`inputs.<name>`**", ""] + _table(INPUT)
    out += ["", "**`outputs[]`** (and a step's `output`, which has no `from`)", ""] + _table(OUTPUT)
    out += ["", "**LoRA items** (`loras[]` of merge and bake, `lora`/`minus` of subtract)", ""] + _table(LORA_ITEM)
    out += ["", "**Steps** — every step has `id` (required, unique among inputs and steps), `op` and an optional "
                "`output`."]
    for op, s in STEP_TYPES.items():
        out += ["", f"*`op: {op}`* — {s.doc}", ""] + _table(s, skip=("id", "op", "output"))
    return "\n".join(out) + "\n"


def write_schema_file(path: str | Path | None = None) -> Path:
    """Write :func:`json_schema` to ``schema.json`` beside this module (or ``path``)."""
    import json

    p = Path(path) if path is not None else Path(__file__).with_name("schema.json")
    p.write_text(json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return p
