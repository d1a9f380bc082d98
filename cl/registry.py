"""Name -> object lookup for task streams, strategies and models, through package entry points.

cl's own built-ins are declared in its `pyproject.toml` under the same groups a third-party
package uses (`cl.tasks`, `cl.strategies`, `cl.models`), so the CLI and the ablation engine find
every one the same way. Nothing registers on import; a name's module loads only when it is used.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import io
import re
import tokenize
import types
import typing
from dataclasses import dataclass
from functools import cache
from importlib.machinery import PathFinder
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from cl.errors import ClError, UsageError

GROUPS = {"stream": "cl.tasks", "strategy": "cl.strategies", "model": "cl.models"}


@cache
def _entry_points(group: str) -> dict[str, EntryPoint]:
    return {entry.name: entry for entry in entry_points(group=group)}


def names(kind: str) -> list[str]:
    """The registered names of a kind (`stream`, `strategy` or `model`), sorted."""
    return sorted(_entry_points(GROUPS[kind]))


def load(kind: str, name: str) -> Any:
    """The object registered as `name`; an unknown name is a UsageError listing the known ones."""
    found = _entry(kind, name)
    try:
        return found.load()
    except (ImportError, AttributeError) as error:  # a broken plugin, not the user's mistake
        raise ClError(f"{kind} {name!r} could not be loaded from {found.value}: {error}") from None


def describe(obj: Any) -> str:
    """The first line of an object's docstring: what `cl list` shows."""
    return _first_line(getattr(obj, "__doc__", None))


def _entry(kind: str, name: str) -> EntryPoint:
    found = _entry_points(GROUPS[kind]).get(name)
    if found is None:
        known = ", ".join(names(kind)) or "none installed"
        raise UsageError(f"unknown {kind} {name!r} (known: {known})")
    return found


def _first_line(doc: str | None) -> str:
    doc = (doc or "").strip()
    return doc.splitlines()[0] if doc else ""


# --- What `cl list` shows, read from source -------------------------------------------------
#
# Importing a strategy to print its name and settings would import torch (seconds). The source
# says the same: an entry point's module is found without being executed, parsed with `ast`,
# and its docstrings and config dataclass are read from the tree. Anything that reading cannot
# settle (a module without source, a computed `config_class`, an inherited dataclass) is
# answered by importing the object, as before, so third-party entry points always list.


@dataclass(frozen=True)
class Setting:
    """One key of a strategy's config dataclass, as `cl list` shows it."""

    name: str
    type: str  # the annotation as written; a module-level alias (`Policy`) is spelled out
    default: str  # repr() of the default value, or "required" when the field has none
    help: str  # the field's comment, else its sentence in the class docstring; may be ""


REQUIRED = "required"
MAX_HOPS = 10  # imports and base classes followed before giving up (and importing instead)


class _Unreadable(Exception):
    """The source does not settle the question; the caller imports the object instead."""


# A file that is not there, not text (ValueError: UnicodeDecodeError) or not Python, or a
# top-level name `find_spec` refuses: read no further, import instead.
_SOURCE_ERRORS = (OSError, SyntaxError, ValueError, ImportError, tokenize.TokenError)


def describe_entry(kind: str, name: str) -> str:
    """The first docstring line of what `name` is registered as, read from source when it can
    be (no import, so no torch); otherwise the object is loaded and `describe`d."""
    entry = _entry(kind, name)
    try:
        return _first_line(_docstring_from_source(entry.module, entry.attr))
    except (_Unreadable, *_SOURCE_ERRORS):
        return describe(load(kind, name))


def strategy_settings(name: str) -> tuple[Setting, ...]:
    """The keys of strategy `name`'s config dataclass, in field order, read from source when it
    can be; otherwise the strategy is loaded and its `config_class` read by `config_settings`."""
    entry = _entry("strategy", name)
    try:
        return _settings_from_source(entry.module, entry.attr)
    except (_Unreadable, *_SOURCE_ERRORS):
        return config_settings(getattr(load("strategy", name), "config_class", None))


def config_settings(config_class: Any) -> tuple[Setting, ...]:
    """The settable keys of an imported config dataclass (none for a class that is not one),
    with help from its docstring only: comments are not kept at run time."""
    if config_class is None or not dataclasses.is_dataclass(config_class):
        return ()
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # an annotation naming what its module never imports: show it as written
        hints = {}
    doc = config_class.__doc__ or ""
    settings = []
    for field in dataclasses.fields(config_class):
        if not field.init:
            continue
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = f"{getattr(field.default_factory, '__name__', 'factory')}()"
        else:
            default = REQUIRED
        settings.append(Setting(field.name, _type_text(hints.get(field.name, field.type)),
                                default, _help_from_docstring(doc, field.name)))
    return tuple(settings)


def _type_text(annotation: Any) -> str:
    """An imported annotation spelled as the source path spells one (`int | None`, not
    `Optional[int]`), so a strategy reads the same whichever way it was listed."""
    if isinstance(annotation, str):
        return annotation  # unresolvable: as written
    if annotation is type(None):
        return "None"
    if annotation is Ellipsis:
        return "..."
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(map(_type_text, arguments))
    if origin is typing.Literal:
        return f"Literal[{', '.join(map(repr, arguments))}]"
    if origin is not None and arguments:
        name = getattr(origin, "__name__", None) or str(origin).replace("typing.", "")
        return f"{name}[{', '.join(map(_type_text, arguments))}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


@dataclass(frozen=True)
class _Source:
    """A module's parsed source: its tree and its lines."""

    module: str
    is_package: bool
    tree: ast.Module
    lines: tuple[str, ...]

    def comment(self, line: int) -> str | None:
        """The comment on source line `line` (1-based), without its `#`; None if it has none.

        Only the lines a setting's help needs are tokenized, one at a time: tokenizing whole
        modules was a third of `cl list`'s time."""
        text = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        if "#" not in text:
            return None
        try:
            tokens = list(tokenize.generate_tokens(io.StringIO(text.strip() + "\n").readline))
        except (tokenize.TokenError, SyntaxError):  # a line of a longer statement or string
            return None
        return next((token.string.lstrip("#").strip() for token in tokens
                     if token.type == tokenize.COMMENT), None)


@cache
def _read_source(module: str) -> _Source:
    """Parse `module`'s source file, found without executing it or any package above it."""
    path = _source_path(module)
    with tokenize.open(path) as file:
        text = file.read()
    return _Source(module, Path(path).name == "__init__.py", ast.parse(text, filename=path),
                   tuple(text.splitlines()))


def _source_path(module: str) -> str:
    """The .py file of `module`. `find_spec` of a dotted name would import its parent packages
    (`strategies/__init__.py` imports every strategy, and torch), so only the top-level name
    goes through it; each submodule is then looked up in its parent's directories."""
    top, *parts = module.split(".")
    spec = importlib.util.find_spec(top)
    for part in parts:
        if spec is None or not spec.submodule_search_locations:
            raise _Unreadable
        spec = PathFinder.find_spec(f"{spec.name}.{part}", list(spec.submodule_search_locations))
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise _Unreadable  # compiled or built in: there is no source to read
    return spec.origin


def _binding(source: _Source, name: str) -> ast.stmt:
    """The top-level statement that last binds `name` in `source`, as the module would run."""
    found = None
    for node in source.tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            if node.name == name:
                found = node
        elif isinstance(node, ast.ImportFrom):
            if any((alias.asname or alias.name) == name for alias in node.names):
                found = node
        elif isinstance(node, ast.Assign):
            if any(isinstance(target, ast.Name) and target.id == name for target in node.targets):
                found = node
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            if isinstance(node.target, ast.Name) and node.target.id == name:
                found = node
    if found is None:
        raise _Unreadable
    return found


def _imported_from(source: _Source, node: ast.ImportFrom, name: str) -> tuple[str, str]:
    """(module, attribute) that `from ... import` binds to `name`."""
    original = next(alias.name for alias in node.names if (alias.asname or alias.name) == name)
    if not node.level:
        return node.module or "", original
    package = source.module if source.is_package else source.module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    if not package:
        raise _Unreadable  # a relative import above the top-level package
    return (f"{package}.{node.module}" if node.module else package), original


def _definition(module: str, name: str, hops: int = 0
                ) -> tuple[_Source, ast.stmt]:
    """The statement that defines `module.name`, following `from ... import` chains."""
    if hops > MAX_HOPS or "." in name:
        raise _Unreadable
    source = _read_source(module)
    node = _binding(source, name)
    if isinstance(node, ast.ImportFrom):
        return _definition(*_imported_from(source, node, name), hops + 1)
    if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Name):
        return _definition(module, node.value.id, hops + 1)  # an alias: `Thing = OtherThing`
    return source, node


def _class(module: str, name: str) -> tuple[_Source, ast.ClassDef]:
    source, node = _definition(module, name)
    if not isinstance(node, ast.ClassDef):
        raise _Unreadable
    return source, node


def _docstring_from_source(module: str, attr: str | None) -> str | None:
    """The docstring of `module.attr` (of the module itself without `attr`); for an instance
    (`HF = Backbone()`), its class's docstring, which is what the instance's `__doc__` is."""
    if not attr:
        return ast.get_docstring(_read_source(module).tree)
    source, node = _definition(module, attr)
    if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
        return ast.get_docstring(node)
    if (isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)):
        return ast.get_docstring(_class(source.module, node.value.func.id)[1])
    raise _Unreadable  # built by a function call or an expression: only running it tells


def _settings_from_source(module: str, attr: str | None) -> tuple[Setting, ...]:
    if not attr:
        raise _Unreadable
    source, strategy = _class(module, attr)
    config_source, config = _config_class(source, strategy)
    return _fields(config_source, config)


def _config_class(source: _Source, strategy: ast.ClassDef, hops: int = 0
                  ) -> tuple[_Source, ast.ClassDef]:
    """The class a strategy's `config_class = Name` names: in its own body, else its bases'."""
    if hops > MAX_HOPS:
        raise _Unreadable
    for node in reversed(strategy.body):
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, ast.AnnAssign) and node.value else [])
        if any(isinstance(target, ast.Name) and target.id == "config_class"
               for target in targets):
            if not isinstance(node.value, ast.Name):
                raise _Unreadable  # computed, or an attribute of another module
            return _class(source.module, node.value.id)
    for base in strategy.bases:  # left to right, as the method resolution order starts
        if isinstance(base, ast.Name):
            base_source, base_class = _class(source.module, base.id)
            try:
                return _config_class(base_source, base_class, hops + 1)
            except _Unreadable:
                continue
    raise _Unreadable


def _is_dataclass_decorator(node: ast.expr) -> bool:
    target = node.func if isinstance(node, ast.Call) else node
    return ((isinstance(target, ast.Name) and target.id == "dataclass")
            or (isinstance(target, ast.Attribute) and target.attr == "dataclass"))


def _named(node: ast.expr, *names: str) -> bool:
    """Whether `node` is `X`, `module.X` or `X[...]` for X in `names` (`ClassVar[int]`)."""
    if isinstance(node, ast.Subscript):
        node = node.value
    return ((isinstance(node, ast.Name) and node.id in names)
            or (isinstance(node, ast.Attribute) and node.attr in names))


def _fields(source: _Source, config: ast.ClassDef) -> tuple[Setting, ...]:
    """The init fields of a config dataclass's class body, as `dataclasses.fields` would list
    them; a class that is no dataclass and declares nothing (`NoConfig`) has none."""
    declared = [node for node in config.body if isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and not _named(node.annotation, "ClassVar", "InitVar", "KW_ONLY")]
    if not any(_is_dataclass_decorator(decorator) for decorator in config.decorator_list):
        if declared:
            raise _Unreadable
        return ()
    if any(not (isinstance(base, ast.Name) and base.id == "object") for base in config.bases):
        raise _Unreadable  # fields inherited from a base dataclass come first: import it
    doc = ast.get_docstring(config) or ""
    aliases = _type_aliases(source)
    settings = []
    for node in declared:
        default = _default(node.value)
        if default is None:
            continue  # field(init=False): not a setting
        settings.append(Setting(node.target.id, _annotation_text(node.annotation, aliases),
                                default, _field_help(source, node, doc)))
    return tuple(settings)


def _default(value: ast.expr | None) -> str | None:
    """The default's repr (as `dataclasses.fields` would give it), REQUIRED, or None for a
    field that is not an __init__ parameter."""
    if value is None:
        return REQUIRED
    if isinstance(value, ast.Call) and _named(value.func, "field"):
        keywords = {keyword.arg: keyword.value for keyword in value.keywords}
        init = keywords.get("init")
        if isinstance(init, ast.Constant) and init.value is False:
            return None
        if "default" in keywords:
            return _value_text(keywords["default"])
        if "default_factory" in keywords:
            return f"{ast.unparse(keywords['default_factory'])}()"
        return REQUIRED
    return _value_text(value)


def _value_text(value: ast.expr) -> str:
    try:
        return repr(ast.literal_eval(value))
    except (ValueError, TypeError):  # not a literal (`2**10`, a constant's name): as written
        return ast.unparse(value)


def _type_aliases(source: _Source) -> dict[str, ast.expr]:
    """Module-level `Name = Literal[...]` / `A | B` aliases, to spell out in annotations."""
    aliases = {}
    for node in source.tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Subscript | ast.BinOp)):
            aliases[node.targets[0].id] = node.value
    return aliases


def _annotation_text(annotation: ast.expr, aliases: dict[str, ast.expr]) -> str:
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        return annotation.value  # a quoted annotation

    class SpellOut(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.expr:
            return aliases.get(node.id, node)

    return ast.unparse(SpellOut().visit(copy.deepcopy(annotation)))


def _field_help(source: _Source, node: ast.AnnAssign, doc: str) -> str:
    """The comment at the end of the field's line; else the comment lines just above it; else
    the field's sentence in the class docstring."""
    for line in range(node.end_lineno or node.lineno, node.lineno - 1, -1):
        comment = source.comment(line)
        if comment is not None and not _comment_only(source, line):
            return comment
    above = []
    line = node.lineno - 1
    while _comment_only(source, line) and (comment := source.comment(line)) is not None:
        above.insert(0, comment)
        line -= 1
    if above:
        return " ".join(above)
    return _help_from_docstring(doc, node.target.id)


def _comment_only(source: _Source, line: int) -> bool:
    return 0 < line <= len(source.lines) and source.lines[line - 1].lstrip().startswith("#")


def _help_from_docstring(doc: str, name: str) -> str:
    """A field's help from a class docstring: a Google-style `name: text` / `name (type): text`
    line, else the first sentence that names it as `name`."""
    entry = re.compile(rf"^\s*{re.escape(name)}\s*(\([^)]*\))?\s*:\s+(\S.*)$")
    for line in doc.splitlines():
        match = entry.match(line)
        if match:
            return match.group(2).strip()
    text = " ".join(doc.split())
    for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z`])", text):
        if f"`{name}`" in sentence:
            return sentence
    return ""
