"""Providers' JSON Schemas of ``device_metadata``, treated as data: a server wrote them, so syncd never
fetches what they refer to, never lets one run for ever, and finds credentials wherever they are.

- :func:`schema_problem`: why a schema cannot be used, checked without running it: larger than
  :data:`MAX_SCHEMA_BYTES`, nested deeper than :data:`MAX_SCHEMA_DEPTH`, a dialect syncd does not
  know, a ``$ref`` to anything outside the schema itself (never fetched: not a URL, not a file) or
  to nothing in it, a reference cycle that does not descend into the instance (it would never end),
  or more than :data:`MAX_EXPANSION` subschemas applying in one place (40 nested ``allOf`` pairs).
- :class:`SchemaIndex`: where a schema puts its write-only credentials (``format: password`` or
  ``writeOnly``), through ``$ref``/``$defs``, ``allOf``/``anyOf``/``oneOf``, ``if``/``then``/
  ``else``, ``items``, ``prefixItems``, ``additionalProperties`` and ``patternProperties`` (every
  pattern taken to match: no regular expression runs in this process).
- :func:`validate`: the checks themselves (``check_schema``, then the instance), run in a worker
  process with a deadline (:data:`VALIDATION_SECONDS`) and a memory limit, killed when it runs
  over: a regular expression that backtracks for ever holds the interpreter that runs it, so it
  must not be this one.

Verdicts are kept per schema fingerprint, so a schema is checked once, not once per edit.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson
from xxhash import xxh3_128_hexdigest

MAX_SCHEMA_BYTES = 256 * 1024  # a provider's schema of one device's metadata; 16 MiB took 29 s to check
MAX_SCHEMA_DEPTH = 64  # JSON nesting of a schema
MAX_EXPANSION = 10_000  # subschemas that apply at one place of an instance, references followed
MAX_WALK = 200_000  # steps of a search for credentials in one instance
VALIDATION_SECONDS = 3.0  # a check still running after this is killed: the edit fails unsent
WORKER_MEMORY = 512 * 1024 * 1024  # address space of the checking process
MAX_ERRORS = 20  # errors reported by one validation (the first by path is the one shown)
# What the checking process keeps of syncd's environment (never the API key's variable).
WORKER_ENVIRONMENT = frozenset({"PATH", "LANG", "LC_ALL", "LD_LIBRARY_PATH", "TMPDIR"})

# Keywords whose value is a schema, a list of schemas, or a map of schemas; and which of them apply
# at the same place of the instance ("in place") rather than to its members.
_IN_PLACE_ONE = ("not", "if", "then", "else")
_IN_PLACE_LIST = ("allOf", "anyOf", "oneOf")
_IN_PLACE_MAP = ("dependentSchemas", "dependencies")
_REFS = ("$ref", "$dynamicRef", "$recursiveRef")
_DESCEND_ONE = (
    "additionalProperties",
    "unevaluatedProperties",
    "items",
    "additionalItems",
    "unevaluatedItems",
    "contains",
    "propertyNames",
    "contentSchema",
)
_DESCEND_LIST = ("prefixItems", "items")
_DESCEND_MAP = ("properties", "patternProperties")
_DEFINITIONS = ("$defs", "definitions")
_DIALECTS = {
    "http://json-schema.org/draft-03/schema": 3,
    "http://json-schema.org/draft-04/schema": 4,
    "http://json-schema.org/draft-06/schema": 6,
    "http://json-schema.org/draft-07/schema": 7,
    "https://json-schema.org/draft/2019-09/schema": 2019,
    "https://json-schema.org/draft/2020-12/schema": 2020,
}


class SchemaUnusable(Exception):
    """A schema syncd will not use, or whose check ran over its deadline (the message says why, one line)."""


class CheckFailed(Exception):
    """The check could not run (the checking process could not start or ended): not the schema's fault."""


def dialect(schema: Any) -> int | None:
    """The JSON Schema dialect a schema names in ``$schema`` (2020-12 when it names none), or None."""
    if not isinstance(schema, dict) or "$schema" not in schema:
        return 2020
    named = schema["$schema"]
    if not isinstance(named, str):
        return None
    return _DIALECTS.get(named.rstrip("#"))


def schema_problem(schema: Any) -> str | None:
    """Why ``schema`` cannot be used to check metadata (one line), or None. Nothing is fetched."""
    try:
        encoded = orjson.dumps(schema)
    except orjson.JSONEncodeError:
        return f"it is nested more than {MAX_SCHEMA_DEPTH} levels deep"
    if len(encoded) > MAX_SCHEMA_BYTES:
        return f"it is {len(encoded)} bytes of JSON, more than syncd checks metadata against ({MAX_SCHEMA_BYTES})"
    return _cached_problem(encoded)


@functools.lru_cache(maxsize=32)
def _cached_problem(encoded: bytes) -> str | None:
    try:
        return _problem_of(orjson.loads(encoded))
    except Exception as exc:  # whatever a schema does to this analysis makes it unusable, never a crash
        return f"syncd could not analyse it ({type(exc).__name__})"


def _problem_of(schema: Any) -> str | None:
    if not isinstance(schema, dict | bool):
        return "it is neither an object nor a boolean"
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        return f"it is nested more than {MAX_SCHEMA_DEPTH} levels deep"
    if isinstance(schema, dict) and dialect(schema) is None:
        return f"its $schema {_short(schema.get('$schema'))} names a JSON Schema dialect syncd does not know"
    try:
        index = SchemaIndex(schema)
        index.check_references()
    except SchemaUnusable as exc:
        return str(exc)
    return None


def _depth(value: Any) -> int:
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        deepest = max(deepest, depth)
        if depth > MAX_SCHEMA_DEPTH:
            return depth
        if isinstance(item, dict):
            pending.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            pending.extend((child, depth + 1) for child in item)
    return deepest


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- the schema as a graph ------------------------------------------------------------------------


def escape(name: str) -> str:
    """A JSON Pointer reference token for ``name``."""
    return name.replace("~", "~0").replace("/", "~1")


def unescape(token: str) -> str:
    """The name a JSON Pointer reference token stands for."""
    return token.replace("~1", "/").replace("~0", "~")


def pointer_parts(pointer: str) -> list[str]:
    """The names of a JSON Pointer (``""`` is the whole document)."""
    return [unescape(p) for p in pointer.split("/")[1:]] if pointer else []


class SchemaIndex:
    """Every subschema of a schema by its location (a JSON Pointer into the schema), what each
    reference points to, and where the schema puts credentials. Building it fetches nothing and
    runs no regular expression."""

    def __init__(self, schema: Any) -> None:
        self.schema = schema
        self.nodes: dict[str, Any] = {}
        self.anchors: dict[tuple[str, str], str] = {}  # (resource, anchor) -> location
        self.resources: dict[str, str] = {}  # an embedded $id -> its location
        self.base: dict[str, str] = {}  # location -> location of the resource it belongs to
        self._draft = dialect(schema) or 2020
        self._collect(schema, "", "")
        self.has_secrets = self.is_secret(self.nodes)

    def _collect(self, node: Any, where: str, resource: str) -> None:
        pending = [(node, where, resource)]
        while pending:
            node, where, resource = pending.pop()
            if where in self.nodes:
                continue
            self.nodes[where] = node
            if not isinstance(node, dict):
                continue
            own_id = node.get("$id" if self._draft >= 6 else "id")
            if self._draft <= 7 and "$ref" in node:
                own_id = None  # up to draft 7 a $ref's siblings are ignored, its $id included (as jsonschema does)
            if isinstance(own_id, str) and own_id:
                if own_id.startswith("#"):
                    self.anchors[(resource, own_id[1:])] = where
                else:
                    resource = where
                    self.resources[own_id.rstrip("#")] = where
            self.base[where] = resource
            for keyword in ("$anchor", "$dynamicAnchor"):
                if isinstance(node.get(keyword), str):
                    self.anchors[(resource, node[keyword])] = where
            for child, at in _children(node, where):
                pending.append((child, at, resource))

    def resolve(self, where: str, reference: str) -> str:
        """The location a reference made at ``where`` points to; SchemaUnusable when it points
        outside the schema or at nothing in it."""
        resource = self.base.get(where, "")
        target, _, fragment = reference.partition("#")
        fragment = unquote(fragment)  # a URI fragment: "#/$defs/a%20b" names "a b"
        if target:
            if target not in self.resources:
                raise SchemaUnusable(
                    f"a $ref to {_short(reference)} at {where or '/'} is outside the schema; "
                    "syncd never fetches a schema reference"
                )
            resource = self.resources[target]
        if fragment == "" or fragment.startswith("/"):
            location = resource + fragment
            try:
                resolve_pointer(self.schema, location)
            except LookupError:
                raise SchemaUnusable(
                    f"the $ref {_short(reference)} at {where or '/'} points to nothing in the schema"
                ) from None
            if location not in self.nodes:
                self._collect(resolve_pointer(self.schema, location), location, resource)
            return location
        found = self.anchors.get((resource, fragment))
        if found is None:
            raise SchemaUnusable(f"the $ref {_short(reference)} at {where or '/'} names no anchor of the schema")
        return found

    def in_place(self, where: str) -> Iterator[str]:
        """Locations of the subschemas that apply where ``where`` applies (references followed)."""
        node = self.nodes.get(where)
        if not isinstance(node, dict):
            return
        for keyword in _REFS:
            reference = node.get(keyword)
            if isinstance(reference, str):
                yield self.resolve(where, reference)
        yield from (at for _, at in _subschemas(node, where, _IN_PLACE_ONE, _IN_PLACE_LIST, _IN_PLACE_MAP))

    def check_references(self) -> None:
        """SchemaUnusable for a reference outside the schema or to nothing, a cycle of references
        that stays in place (it would never end), or more than :data:`MAX_EXPANSION` subschemas
        that apply at one place."""
        sizes: dict[str, int] = {}
        for where in list(self.nodes):
            self._expansion(where, sizes)

    def _expansion(self, start: str, sizes: dict[str, int]) -> int:
        """How many subschemas apply where ``start`` does, counted as a validator would visit them
        (no memory between branches); without recursion, so a long chain of references costs time,
        not the interpreter's stack."""
        if start in sizes:
            return sizes[start]
        on_path = {start}
        stack: list[tuple[str, Iterator[str], int]] = [(start, self.in_place(start), 1)]
        while stack:
            where, children, total = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.discard(where)
                sizes[where] = total
                if stack:
                    parent, rest, subtotal = stack[-1]
                    stack[-1] = (parent, rest, subtotal + total)
                    if subtotal + total > MAX_EXPANSION:
                        raise SchemaUnusable(
                            f"more than {MAX_EXPANSION} of its subschemas apply at {parent or '/'} once its "
                            "references are followed; it is too complex to check"
                        )
                continue
            if child in sizes:
                stack[-1] = (where, children, total + sizes[child])
                if total + sizes[child] > MAX_EXPANSION:
                    raise SchemaUnusable(
                        f"more than {MAX_EXPANSION} of its subschemas apply at {where or '/'} once its "
                        "references are followed; it is too complex to check"
                    )
                continue
            if child in on_path:
                raise SchemaUnusable(
                    f"its references at {child or '/'} form a cycle that never reaches into the metadata; "
                    "checking it would never end"
                )
            on_path.add(child)
            stack.append((child, self.in_place(child), 1))
        return sizes[start]

    # -- credentials ------------------------------------------------------------------------------

    def closure(self, locations: Collection[str], budget: list[int]) -> set[str]:
        """``locations`` and every subschema that applies with them, references followed (a
        reference that cannot be followed is left out: the schema's check reports it)."""
        seen: set[str] = set()
        pending = list(locations)
        while pending:
            where = pending.pop()
            if where in seen:
                continue
            budget[0] -= 1
            if budget[0] < 0:
                raise SchemaUnusable("it is too complex to find its credential fields in this metadata")
            seen.add(where)
            with contextlib.suppress(SchemaUnusable):
                pending.extend(self.in_place(where))
        return seen

    def is_secret(self, locations: Collection[str]) -> bool:
        """Whether any of these subschemas marks a write-only credential."""
        for where in locations:
            node = self.nodes.get(where)
            if isinstance(node, dict) and (node.get("format") == "password" or node.get("writeOnly") is True):
                return True
        return False

    def members(self, locations: Collection[str], name: str | int) -> set[str]:
        """The subschemas that may apply to member ``name`` (a property, or an array index) of a
        value the ``locations`` apply to. Every ``patternProperties`` schema is taken to apply."""
        found: set[str] = set()
        for where in locations:
            node = self.nodes.get(where)
            if not isinstance(node, dict):
                continue
            if isinstance(name, str):
                found.update(_property_schemas(node, where, name))
            else:
                found.update(_item_schemas(node, where, name))
        return found

    def credentials_in(self, instance: Any) -> set[str]:
        """JSON Pointers of the values in ``instance`` that the schema marks as credentials
        (a credential's whole value: nothing below it is listed)."""
        budget = [MAX_WALK]
        found: set[str] = set()
        if not self.has_secrets:
            return found
        pending: list[tuple[set[str], Any, str]] = [({""}, instance, "")]
        while pending:
            locations, value, pointer = pending.pop()
            applying = self.closure(locations, budget)
            if self.is_secret(applying):
                found.add(pointer)
                continue
            members: Iterator[tuple[str | int, Any]]
            if isinstance(value, dict):
                members = iter(value.items())
            elif isinstance(value, list):
                members = iter(enumerate(value))
            else:
                continue
            for name, child in members:
                below = self.members(applying, name)
                if below:
                    pending.append((below, child, f"{pointer}/{escape(str(name))}"))
        return found

    def is_credential(self, pointer: str) -> bool:
        """Whether the schema marks the value at ``pointer`` (or a value around it) as a credential."""
        if not self.has_secrets:
            return False
        budget = [MAX_WALK]
        locations = self.closure({""}, budget)
        for part in pointer_parts(pointer):
            if self.is_secret(locations):
                return True
            below = self.members(locations, part)
            if part.isdigit():
                below |= self.members(locations, int(part))
            locations = self.closure(below, budget)
            if not locations:
                return False
        return self.is_secret(locations)


def _property_schemas(node: dict[str, Any], where: str, name: str) -> Iterator[str]:
    """The subschemas of the schema object ``node`` that may apply to its instance's property ``name``."""
    properties = node.get("properties")
    if isinstance(properties, dict) and isinstance(properties.get(name), dict | bool):
        yield f"{where}/properties/{escape(name)}"
    patterns = node.get("patternProperties")
    if isinstance(patterns, dict):
        yield from (f"{where}/patternProperties/{escape(str(p))}" for p in patterns)
    for keyword in ("additionalProperties", "unevaluatedProperties"):
        if isinstance(node.get(keyword), dict):
            yield f"{where}/{keyword}"


def _item_schemas(node: dict[str, Any], where: str, index: int) -> Iterator[str]:
    """The subschemas of the schema object ``node`` that may apply to its instance's item ``index``."""
    items = node.get("items")
    prefix = node.get("prefixItems")
    if isinstance(prefix, list) and index < len(prefix):
        yield f"{where}/prefixItems/{index}"
    if isinstance(items, list) and index < len(items):
        yield f"{where}/items/{index}"
    elif isinstance(items, dict):
        yield f"{where}/items"
    for keyword in ("additionalItems", "unevaluatedItems", "contains"):
        if isinstance(node.get(keyword), dict):
            yield f"{where}/{keyword}"


def _children(node: dict[str, Any], where: str) -> Iterator[tuple[Any, str]]:
    """The subschemas written directly inside a schema object, with their locations."""
    return _subschemas(
        node,
        where,
        (*_IN_PLACE_ONE, *_DESCEND_ONE),
        (*_IN_PLACE_LIST, *_DESCEND_LIST),
        (*_IN_PLACE_MAP, *_DESCEND_MAP, *_DEFINITIONS),
    )


def _subschemas(
    node: dict[str, Any], where: str, one: tuple[str, ...], lists: tuple[str, ...], maps: tuple[str, ...]
) -> Iterator[tuple[Any, str]]:
    """The subschemas written in ``node`` under these keywords (a schema, a list of them, a map of
    them), with their locations."""
    for keyword in one:
        if isinstance(node.get(keyword), dict | bool):
            yield node[keyword], f"{where}/{keyword}"
    for keyword in lists:
        if isinstance(node.get(keyword), list):
            for i, sub in enumerate(node[keyword]):
                yield sub, f"{where}/{keyword}/{i}"
    for keyword in maps:
        if isinstance(node.get(keyword), dict):
            for name, sub in node[keyword].items():
                if isinstance(sub, dict | bool):
                    yield sub, f"{where}/{keyword}/{escape(str(name))}"


def resolve_pointer(document: Any, pointer: str) -> Any:
    """The value at a JSON Pointer of ``document``; LookupError when there is none."""
    value = document
    for part in pointer_parts(pointer):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise LookupError(pointer)
    return value


@functools.lru_cache(maxsize=16)
def _index(encoded: bytes) -> SchemaIndex:
    return SchemaIndex(orjson.loads(encoded))


def index_of(schema: Any) -> SchemaIndex:
    """The :class:`SchemaIndex` of a schema (kept for the schemas used last)."""
    try:
        encoded = orjson.dumps(schema)
    except orjson.JSONEncodeError:
        return SchemaIndex(False)
    return _index(encoded)


# -- checking, in a worker process -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SchemaError:
    """One way an instance does not satisfy a schema, as the worker reports it."""

    path: tuple[str | int, ...]
    validator: str
    message: str
    missing: tuple[str, ...] = ()  # for ``required``: the names the instance lacks

    @property
    def pointer(self) -> str:
        """Where in the instance, as a JSON Pointer."""
        return "".join(f"/{escape(str(p))}" for p in self.path)


def validate(schema: Any, instance: Any, seconds: float = VALIDATION_SECONDS) -> list[SchemaError]:
    """The errors of ``instance`` against ``schema`` (the first :data:`MAX_ERRORS`, by path).
    SchemaUnusable when the schema cannot be used (see :func:`schema_problem`), is not a valid
    schema of its dialect, or its check failed or ran longer than ``seconds``."""
    problem = schema_problem(schema)
    if problem:
        raise SchemaUnusable(problem)
    return _worker.ask(schema, instance, seconds)


class _Worker:
    """One checking process, started when first needed and again after it was killed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._served = 0
        self._asked = 0

    def ask(self, schema: Any, instance: Any, seconds: float) -> list[SchemaError]:
        with self._lock:
            self._asked += 1
            digest = xxh3_128_hexdigest(orjson.dumps(schema))  # the worker keeps a checked schema by it
            request = orjson.dumps({"id": self._asked, "schema": schema, "instance": instance, "fingerprint": digest})
            try:
                proc = self._ready()
                assert proc.stdin is not None and proc.stdout is not None
                deadline = time.monotonic() + seconds
                proc.stdin.write(struct.pack(">I", len(request)) + request)
                proc.stdin.flush()
                (size,) = struct.unpack(">I", _read(proc.stdout.fileno(), 4, deadline))
                answer = orjson.loads(_read(proc.stdout.fileno(), size, deadline))
                if not isinstance(answer, dict) or answer.get("id") != self._asked:
                    raise EOFError("an answer to another request")
            except TimeoutError:
                self._kill()
                raise SchemaUnusable(
                    f"checking the metadata against it took longer than {seconds:g}s (a pattern or a schema "
                    "that would run for ever); the check was stopped"
                ) from None
            except (OSError, EOFError, ValueError, struct.error) as exc:
                code = self._proc.poll() if self._proc is not None else None
                self._kill()
                ended = f", the checking process ended with {code}" if code is not None else ""
                raise CheckFailed(f"the metadata check could not run ({type(exc).__name__}{ended})") from None
            except BaseException:  # a Ctrl-C between question and answer: never read an old answer later
                self._kill()
                raise
            self._served += 1
            if self._served >= 500:  # a fresh process now and then: nothing a schema left behind stays
                self._kill()
        if answer.get("unusable"):
            raise SchemaUnusable(str(answer["unusable"]))
        return [
            SchemaError(tuple(e["path"]), e["validator"], e["message"], tuple(e.get("missing", ())))
            for e in answer["errors"]
        ]

    def _ready(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._proc = subprocess.Popen(
            # -I: nothing from the working directory or the user's site shadows syncd's own modules
            [sys.executable, "-I", "-m", "syncd.schemas"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if k in WORKER_ENVIRONMENT},
            close_fds=True,
        )
        self._served = 0
        return self._proc

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()

    def close(self) -> None:
        """Stop the worker (at exit; it would also end at the end of its input)."""
        with self._lock:
            self._kill()


def _read(fd: int, size: int, deadline: float) -> bytes:
    chunks, left = [], size
    poller = select.poll()  # not select(): it cannot wait on a descriptor numbered 1024 or more
    poller.register(fd, select.POLLIN)
    while left:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            raise TimeoutError
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


_worker = _Worker()
atexit.register(_worker.close)


# -- the worker's side -----------------------------------------------------------------------------


def _serve() -> None:
    """Answer requests on stdin until it closes: ``check_schema``, then the instance's errors."""
    import resource

    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the parent's to handle
    sys.setrecursionlimit(5000)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    checked: dict[str, Callable[[Any], Any]] = {}
    while True:
        head = stdin.read(4)
        if len(head) < 4:
            return
        request = orjson.loads(stdin.read(struct.unpack(">I", head)[0]))
        _limit_cpu(resource)
        try:
            answer: dict[str, Any] = {"errors": _errors(request, checked)}
        except _Unusable as exc:
            answer = {"unusable": str(exc)}
        except RecursionError:
            answer = {"unusable": "checking the metadata against it recursed without end"}
        except MemoryError:
            answer = {"unusable": "checking the metadata against it needed more memory than syncd allows"}
        except Exception as exc:  # a schema that breaks the validator is unusable, nothing more
            answer = {"unusable": f"checking the metadata against it failed: {type(exc).__name__}: {_short(str(exc))}"}
        body = orjson.dumps({**answer, "id": request.get("id")})
        stdout.write(struct.pack(">I", len(body)) + body)
        stdout.flush()


class _Unusable(Exception):
    pass


def _errors(request: dict[str, Any], checked: dict[str, Callable[[Any], Any]]) -> list[dict[str, Any]]:
    from jsonschema import validators
    from jsonschema.exceptions import SchemaError as InvalidSchema
    from referencing import Registry
    from referencing.exceptions import NoSuchResource

    def refuse(uri: str) -> Any:
        raise NoSuchResource(ref=uri)  # type: ignore[call-arg]  # (attrs) never fetched: references are data

    schema, digest = request["schema"], request["fingerprint"]
    iterate = checked.get(digest)
    if iterate is None:
        classes = {
            3: validators.Draft3Validator,
            4: validators.Draft4Validator,
            6: validators.Draft6Validator,
            7: validators.Draft7Validator,
            2019: validators.Draft201909Validator,
            2020: validators.Draft202012Validator,
        }
        cls: Any = classes.get(dialect(schema) or 0)
        if cls is None:
            raise _Unusable("its $schema names a JSON Schema dialect syncd does not know")
        try:
            cls.check_schema(schema)
        except InvalidSchema as exc:
            raise _Unusable(f"it is not a valid JSON Schema ({_short(exc.message, 100)})") from None
        registry: Any = Registry(retrieve=refuse)  # type: ignore[call-arg]  # an attrs class
        iterate = cls(schema, registry=registry).iter_errors
        if len(checked) > 32:
            checked.clear()
        checked[digest] = iterate
    errors = []
    for error in iterate(request["instance"]):
        item: dict[str, Any] = {
            "path": list(error.absolute_path),
            "validator": str(error.validator),
            "message": error.message[:1000],
        }
        if error.validator == "required" and isinstance(error.instance, dict):
            item["missing"] = [n for n in error.validator_value if isinstance(n, str) and n not in error.instance]
        errors.append(item)
        if len(errors) >= 200:
            break
    errors.sort(key=lambda e: [str(p) for p in e["path"]])
    return errors[:MAX_ERRORS]


def _limit_cpu(resource: Any) -> None:
    """The kernel ends this process once a request has used a few times its deadline of CPU: the
    parent kills it sooner, but a parent that died cannot, and a regular expression that
    backtracks for ever holds this interpreter (its own threads could not stop it)."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    spent = int(used.ru_utime + used.ru_stime) + 1
    with contextlib.suppress(ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        soft = spent + int(4 * VALIDATION_SECONDS) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


if __name__ == "__main__":
    _serve()
