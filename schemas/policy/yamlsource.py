"""YAML text to plain values plus source positions, parsed once.

`parse_yaml(data, path)` decodes the bytes (UTF-8 only), lets PyYAML's composer build the node
tree (libyaml's `CParser` when PyYAML has it, the pure-Python composer otherwise; tags are
resolved as PyYAML's `SafeLoader` does, YAML 1.1), and then builds the plain values itself:
`dict`, `list`, `str`, `int`, `float`, `bool`, `None`. While building it records, for every
path into the value (`("spec", "allow", "db_names", 0)`), where the key and where the value
start, so that a validator working on plain values can be mapped back to `file:line:col`.

Rules of this module, on top of YAML's:
- A key that appears twice in one mapping is an error at the second occurrence (PyYAML keeps
  the last one silently, which would let a later line quietly widen access).
- Mapping keys are text: a plain scalar key is taken as written (`yes:` is the key "yes", not
  the boolean true); a list or mapping used as a key is an error.
- Aliases are expanded, merge keys (`<<: *base`) are honoured; a recursive alias, more than
  `MAX_NODES` values in one document (the "billion laughs"), or nesting deeper than
  `MAX_DEPTH` is an error, never a hang or a crash.
- Explicit tags other than YAML's core ones (`!!binary`, `!custom`) are errors. A timestamp
  (`2021-01-01`) stays the text it was written as.
- An empty document (nothing between `---` markers) is skipped.
- Text must be UTF-8 (a UTF-8 byte order mark is accepted) without control characters.

Sans-IO: strings and bytes in, values and problems out. It never opens a file.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from schemas.policy.problems import Problem

MAX_NODES = 100_000  # values built for one document, aliases expanded
MAX_DEPTH = 64  # nesting of lists and mappings in one document
# The libyaml composer recurses in C once per nesting level; deep enough input overflows the
# C stack and kills the process. Input that could nest deeper than this goes to the
# pure-Python composer, which fails with RecursionError instead.
_C_SAFE_DEPTH = 1000

Path = tuple[str | int, ...]

_TAG = "tag:yaml.org,2002:"
_STR, _NULL, _BOOL, _INT, _FLOAT = (_TAG + t for t in ("str", "null", "bool", "int", "float"))
_TIMESTAMP, _SEQ, _MAP, _MERGE = (_TAG + t for t in ("timestamp", "seq", "map", "merge"))


@functools.lru_cache(maxsize=4096)
def _plain_tag(value: str) -> str:
    """YAML 1.1's implicit tag of a plain scalar (`yes` is a bool, `12` an int, ...)."""
    resolvers = yaml.resolver.Resolver.yaml_implicit_resolvers
    for tag, regexp in resolvers.get(value[:1], []) + resolvers.get(None, []):
        if regexp.match(value):
            return str(tag)
    return _STR


class _Resolver(yaml.resolver.BaseResolver):
    """PyYAML's SafeLoader tags, resolved faster: policy files use no path resolvers, so
    the per-node bookkeeping for them is skipped, and plain scalars are memoized."""

    def descend_resolver(self, current_node: Any, current_index: Any) -> None:
        return None

    def ascend_resolver(self) -> None:
        return None

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        if kind is ScalarNode:
            return _plain_tag(value) if implicit[0] else _STR
        return _SEQ if kind is SequenceNode else _MAP


class _PyLoader(
    yaml.reader.Reader,
    yaml.scanner.Scanner,
    yaml.parser.Parser,
    yaml.composer.Composer,
    _Resolver,
):
    """The pure-Python composer (no constructor: values are built by `_Builder`)."""

    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        _Resolver.__init__(self)


_Loader: Any = _PyLoader
if getattr(yaml, "__with_libyaml__", False):
    from yaml.cyaml import CParser

    class _CLoader(CParser, _Resolver):  # type: ignore[misc]
        """libyaml's composer."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            _Resolver.__init__(self)

    _Loader = _CLoader


# YAML 1.1's printable set, inverted: these characters may not appear in a YAML stream.
_BAD_CHAR = re.compile("[^\t\n\r\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}


class Position(NamedTuple):
    """A 1-based line and column (columns count characters)."""

    line: int
    col: int


@dataclass(slots=True)
class Document:
    """One YAML document: its plain value, and where each part of it was written."""

    value: Any
    index: int  # 0-based position of the document in its file
    start: Position  # where the document's content starts
    # path -> (key line, key col, value line, value col), all 1-based
    marks: dict[Path, tuple[int, int, int, int]] = field(repr=False)

    def key_position(self, path: Path) -> Position | None:
        """Where the key of `path` is written (a list item's own start); None if absent."""
        m = self.marks.get(path)
        return None if m is None else Position(m[0], m[1])

    def value_position(self, path: Path) -> Position | None:
        """Where the value at `path` starts; None if the path is not in the document."""
        m = self.marks.get(path)
        return None if m is None else Position(m[2], m[3])


@dataclass(slots=True)
class YamlFile:
    """The documents read from one file, and the problems met reading it."""

    documents: list[Document]
    problems: list[Problem]


class _Abandon(Exception):
    """The document cannot be built; the problem says why."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def _problem(path: str, line: int, col: int, message: str, rule: str) -> Problem:
    return Problem(path, line, col, "error", "", "", message, rule)


def decode(data: bytes | str, path: str) -> tuple[str | None, Problem | None]:
    """Bytes to text: UTF-8 (with or without a byte order mark), no control characters."""
    if isinstance(data, bytes):
        data = data.removeprefix(b"\xef\xbb\xbf")
        for bom, name in _BOMS.items():
            if data.startswith(bom):
                return None, _problem(
                    path, 1, 1, f"the file is {name}; save it as UTF-8", "file-encoding"
                )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            prefix = data[: exc.start]
            line = prefix.count(b"\n") + 1
            line_start = prefix.rfind(b"\n") + 1
            col = len(prefix[line_start:].decode("utf-8", "replace")) + 1
            bad = data[exc.start : exc.start + 1].hex()
            return None, _problem(
                path,
                line,
                col,
                f"not valid UTF-8 (byte 0x{bad}); save the file as UTF-8",
                "file-encoding",
            )
    else:
        text = data.removeprefix("\ufeff")
    bad_char = _BAD_CHAR.search(text)
    if bad_char is not None:
        prefix = text[: bad_char.start()]
        line = prefix.count("\n") + 1
        col = bad_char.start() - (prefix.rfind("\n") + 1) + 1
        return None, _problem(
            path,
            line,
            col,
            f"control character U+{ord(bad_char.group()):04X} is not allowed in YAML; remove it",
            "file-encoding",
        )
    return text, None


@functools.lru_cache(maxsize=64)
def _block_prefix_at_least(width: int) -> re.Pattern[str]:
    return re.compile(r"^[ \-?:]{" + str(width) + "}", re.MULTILINE)


def _c_composer_is_safe(text: str) -> bool:
    """Whether collections in `text` cannot nest deeper than `_C_SAFE_DEPTH`.

    A nested block collection starts to the right of its parent (or, for a list under a
    mapping key, in the same column: two levels per column), so block nesting is bounded
    by twice the widest run of indentation and `- `/`? `/`: ` indicators at a line start;
    every flow level needs a `[` or `{` (an implicit mapping inside a flow list adds one).
    The bound is 2 * (widest + 2) + 2 * brackets.
    """
    room = _C_SAFE_DEPTH // 2 - 2 - (text.count("[") + text.count("{"))
    if room <= 0:
        return False
    if len(text) <= room:
        return True
    return _block_prefix_at_least(room + 1).search(text) is None


_HINTS = {
    "found a tab character": "indent with spaces, not tabs",
    "mapping values are not allowed": "is there a ': ' inside an unquoted value? quote the "
    "value, or check the indentation",
    "found undefined alias": "define the anchor (&name) in the same document before "
    "using it (*name)",
    "found duplicate anchor": "give each anchor (&name) its own name",
}


def _char_at(text: str, line: int, column: int) -> str:
    lines = text.split("\n", line + 1)
    if line < len(lines) and column < len(lines[line]):
        return lines[line][column]
    return ""


def _syntax_problem(path: str, text: str, exc: yaml.YAMLError) -> Problem:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = exc.problem or "invalid YAML"
        hint = next((h for start, h in _HINTS.items() if problem.startswith(start)), None)
        if "that cannot start any token" in problem:
            # libyaml does not name the character; the pure-Python scanner does.
            char = _char_at(text, mark.line, mark.column)
            if char == "\t":
                problem, hint = "found a tab character", "indent with spaces, not tabs"
            elif char:
                problem = f"found character {char!r} that cannot start any token"
                hint = "quote the value"
        message = problem
        if (
            exc.context
            and exc.context_mark is not None
            and (exc.context_mark.line != mark.line or exc.context_mark.column != mark.column)
        ):
            message += (
                f" ({exc.context}, which starts at line {exc.context_mark.line + 1}, "
                f"column {exc.context_mark.column + 1})"
            )
        if hint:
            message += f": {hint}"
        return _problem(path, mark.line + 1, mark.column + 1, message, "yaml-syntax")
    return _problem(path, 0, 0, f"invalid YAML: {exc}", "yaml-syntax")


class _Builder:
    """Builds one document's plain value from its node tree, recording positions.

    Plain-text scalars, most of any policy file, take a short path inline in the loops;
    everything else goes through `build`.
    """

    def __init__(self, path: str, root: Node, merges: bool) -> None:
        self.path = path
        self.root = root
        self.merges = merges  # False when the text has no `<<`: no merge key to look for
        self.marks: dict[Path, tuple[int, int, int, int]] = {}
        self.problems: list[Problem] = []
        self.budget = MAX_NODES
        self.active: set[int] = set()
        self.scalars = yaml.constructor.SafeConstructor()

    def fail(self, node: Node, message: str, rule: str) -> _Abandon:
        m = node.start_mark
        return _Abandon(_problem(self.path, m.line + 1, m.column + 1, message, rule))

    def build(self, node: Node, path: Path, kline: int, kcol: int, depth: int) -> Any:
        m = node.start_mark
        self.marks[path] = (kline, kcol, m.line + 1, m.column + 1)
        self.budget -= 1
        if isinstance(node, ScalarNode):
            return self.scalar(node)
        if self.budget < 0:
            raise self.fail(
                self.root,
                f"this document expands to more than {MAX_NODES} values (aliases included); "
                "split it or use fewer aliases",
                "yaml-alias",
            )
        if depth >= MAX_DEPTH:
            raise self.fail(
                node, f"lists and mappings nest deeper than {MAX_DEPTH} levels", "yaml-syntax"
            )
        if id(node) in self.active:
            raise self.fail(node, "recursive alias: a value that contains itself", "yaml-alias")
        self.active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                if node.tag != _SEQ:
                    raise self.fail(node, self.tag_message(node.tag), "yaml-tag")
                return self.sequence(node, path, depth)
            if isinstance(node, MappingNode):
                if node.tag != _MAP:
                    raise self.fail(node, self.tag_message(node.tag), "yaml-tag")
                return self.mapping(node, path, depth)
        finally:
            self.active.discard(id(node))
        raise self.fail(node, "unexpected YAML node", "yaml-syntax")  # pragma: no cover

    def sequence(self, node: SequenceNode, path: Path, depth: int) -> list[Any]:
        out: list[Any] = []
        marks = self.marks
        for i, item in enumerate(node.value):
            m = item.start_mark
            line, col = m.line + 1, m.column + 1
            if item.__class__ is ScalarNode and item.tag == _STR:
                marks[(*path, i)] = (line, col, line, col)
                self.budget -= 1
                out.append(item.value)
            else:
                out.append(self.build(item, (*path, i), line, col, depth + 1))
        return out

    def mapping(self, node: MappingNode, path: Path, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        marks = self.marks
        merged: set[str] = set()
        if self.merges and any(k.tag == _MERGE for k, _ in node.value):
            # Merge keys first: keys written in the mapping itself then override merged
            # ones (values and positions); among several merged mappings the first wins.
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE and isinstance(key_node, ScalarNode):
                    self.merge(value_node, path, depth, out)
            merged = set(out)
        for key_node, value_node in node.value:
            km = key_node.start_mark
            kline, kcol = km.line + 1, km.column + 1
            if key_node.__class__ is not ScalarNode:
                self.problems.append(
                    _problem(
                        self.path,
                        kline,
                        kcol,
                        "a mapping key must be plain text, not a list or mapping",
                        "yaml-key",
                    )
                )
                continue
            if key_node.tag == _MERGE:
                continue
            key = sys.intern(key_node.value)
            child = (*path, key)
            if key in out:
                if key not in merged:
                    self.problems.append(
                        _problem(
                            self.path,
                            kline,
                            kcol,
                            f"duplicate key {key!r}: it is already set at line "
                            f"{marks[child][0]}; keep one of the two",
                            "yaml-duplicate-key",
                        )
                    )
                    continue
                merged.discard(key)
                n = len(child)
                for stale in [p for p in marks if p[:n] == child]:
                    del marks[stale]
            if value_node.__class__ is ScalarNode and value_node.tag == _STR:
                m = value_node.start_mark
                marks[child] = (kline, kcol, m.line + 1, m.column + 1)
                self.budget -= 1
                out[key] = value_node.value
            else:
                out[key] = self.build(value_node, child, kline, kcol, depth + 1)
        return out

    def merge(self, value: Node, path: Path, depth: int, out: dict[str, Any]) -> None:
        sources = value.value if isinstance(value, SequenceNode) else [value]
        own = self.marks[path]
        for source in sources:
            if not isinstance(source, MappingNode):
                raise self.fail(
                    source,
                    "a merge key (<<) takes a mapping or a list of mappings",
                    "yaml-syntax",
                )
            for k, v in self.build(source, path, own[0], own[1], depth).items():
                out.setdefault(k, v)
        self.marks[path] = own

    def scalar(self, node: ScalarNode) -> Any:
        tag = node.tag
        if tag in (_STR, _TIMESTAMP):
            return node.value
        if tag == _NULL:
            return None
        try:
            if tag == _BOOL:
                return self.scalars.construct_yaml_bool(node)
            if tag == _INT:
                return self.scalars.construct_yaml_int(node)
            if tag == _FLOAT:
                return self.scalars.construct_yaml_float(node)
        except (ValueError, KeyError, OverflowError):
            shown = node.value if len(node.value) <= 40 else node.value[:37] + "..."
            raise self.fail(
                node,
                f"cannot read {shown!r} as a {tag.rsplit(':', 1)[-1]} (too large?); "
                "quote it if it is meant as text",
                "yaml-syntax",
            ) from None
        raise self.fail(node, self.tag_message(tag), "yaml-tag")

    @staticmethod
    def tag_message(tag: str) -> str:
        shown = "!!" + tag[len(_TAG) :] if tag.startswith(_TAG) else tag
        return (
            f"unsupported tag {shown}: policy files hold plain text, numbers, booleans, "
            "lists and mappings"
        )


def parse_yaml(data: bytes | str, path: str) -> YamlFile:
    """Parse every document of one file. Problems use `path` as their location."""
    text, problem = decode(data, path)
    if text is None:
        assert problem is not None
        return YamlFile([], [problem])
    loader_class = _Loader if _c_composer_is_safe(text) else _PyLoader
    documents: list[Document] = []
    problems: list[Problem] = []
    loader = loader_class(text)
    merges = "<<" in text
    index = 0
    try:
        while loader.check_node():
            node = loader.get_node()
            this = index
            index += 1
            if isinstance(node, ScalarNode) and node.tag == _NULL:
                continue  # an empty document
            builder = _Builder(path, node, merges)
            start = (node.start_mark.line + 1, node.start_mark.column + 1)
            try:
                value = builder.build(node, (), *start, 0)
                if builder.budget < 0:  # scalars are counted but checked at collections
                    raise builder.fail(
                        node,
                        f"this document expands to more than {MAX_NODES} values; split it",
                        "yaml-alias",
                    )
            except _Abandon as abandon:
                problems.extend(builder.problems)
                problems.append(abandon.problem)
                continue
            problems.extend(builder.problems)
            documents.append(Document(value, this, Position(*start), builder.marks))
    except yaml.YAMLError as exc:
        problems.append(_syntax_problem(path, text, exc))
    except RecursionError:
        problems.append(
            _problem(
                path,
                0,
                0,
                f"lists and mappings nest deeper than {MAX_DEPTH} levels",
                "yaml-syntax",
            )
        )
    finally:
        loader.dispose()
    return YamlFile(documents, problems)
