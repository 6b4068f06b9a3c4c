"""Reading a domain XML file safely and turning it into plain dicts (xmltodict's shape).

Safety: the size is limited before anything is parsed, entity declarations are refused (no XXE,
no billion laughs), only regular files are read and they are opened non-blocking so a FIFO or a
device node in the domains directory can never block the caller.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any
from xml.parsers import expat

from qemud.errors import DomainError, Problem

#: Larger files are refused: a libvirt domain definition is a few KiB; libvirt's biggest test
#: input is under 20 KiB.
MAX_XML_BYTES = 1024 * 1024

#: XML namespaces qemud understands, mapped to the prefixes its models use.
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
QEMUD_NS = "http://qemud.org/xmlns/domain/1.0"
NAMESPACES = {QEMU_NS: "qemu", QEMUD_NS: "qemud"}


def read_domain_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read a domain file's bytes: a regular file, within the size limit, never blocking."""
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise DomainError.at("", "no such file") from None
    except IsADirectoryError:
        raise DomainError.at("", "is a directory, not a domain XML file") from None
    except OSError as exc:
        raise DomainError.at("", f"cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device node")
            raise DomainError.at("", f"is {kind}, not a regular file")
        if st.st_size > MAX_XML_BYTES:
            raise DomainError.at("", f"is {st.st_size} bytes; a domain file may have at most {MAX_XML_BYTES}")
        chunks = []
        total = 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_XML_BYTES:  # grew while we read it
                raise DomainError.at("", f"is larger than {MAX_XML_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise DomainError.at("", f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)


def parse_xml(data: bytes | str) -> dict[str, Any]:
    """Parse XML text into xmltodict's dict shape, with namespaces mapped to known prefixes.

    Raises DomainError with the parser's line number for malformed input.
    """
    if isinstance(data, str):
        try:
            data = data.encode("utf-8")
        except UnicodeEncodeError:
            raise DomainError.at("", "is not valid Unicode text") from None
    if len(data) > MAX_XML_BYTES:
        raise DomainError.at("", f"is {len(data)} bytes; a domain file may have at most {MAX_XML_BYTES}")
    if not data.strip():
        raise DomainError.at("", "is empty")
    try:
        doc = _to_dict(data)
    except expat.ExpatError as exc:
        msg = expat.ErrorString(exc.code) if exc.code else str(exc)
        raise DomainError([Problem("", f"not well-formed XML: {msg} (column {exc.offset + 1})",
                                   line=exc.lineno)]) from None
    except ValueError as exc:  # xmltodict: entity declarations are refused
        if "entities" in str(exc):
            raise DomainError.at("", "XML entity declarations are not allowed in a domain file") from None
        raise DomainError.at("", f"cannot parse: {exc}") from None
    except RecursionError:
        raise DomainError.at("", "XML is nested too deeply") from None
    if not isinstance(doc, dict) or not doc:
        raise DomainError.at("", "holds no XML element")
    return doc


class _DictBuilder:
    """expat events -> xmltodict's dict shape, exactly as ``xmltodict.parse(data,
    process_namespaces=True, namespaces=NAMESPACES, disable_entities=True)`` builds it: an
    attribute is ``@name``, text ``#text`` (whitespace-stripped, None when empty), a repeated
    child a list, namespaced names ``prefix:name`` (known namespaces) or ``uri:name``, namespace
    declarations ``@xmlns`` ({prefix: uri}) on their element.

    qemud's own because importing xmltodict imports xml.sax.saxutils, which imports
    urllib.request, http.client and email (for xmltodict's unparse, never used here): about
    10 ms of every daemon start. tests/test_xmlload_parity.py checks it against xmltodict."""

    def __init__(self) -> None:
        self.stack: list[tuple[dict[str, Any] | None, list[str]]] = []
        self.item: dict[str, Any] | None = None
        self.data: list[str] = []
        self.ns_decls: dict[str, str] = {}

    @staticmethod
    def _name(full: str) -> str:
        i = full.rfind(":")
        if i == -1:
            return full
        ns, name = full[:i], full[i + 1:]
        short = NAMESPACES.get(ns, ns)
        return f"{short}:{name}" if short else name

    def start_ns(self, prefix: str | None, uri: str) -> None:
        self.ns_decls[prefix or ""] = uri

    def start(self, full: str, attrs: list[str]) -> None:
        items: dict[str, Any] = {"@" + self._name(k): v for k, v in zip(attrs[0::2], attrs[1::2])}
        if self.ns_decls:
            items["@xmlns"] = self.ns_decls
            self.ns_decls = {}
        self.stack.append((self.item, self.data))
        self.item = items or None
        self.data = []

    def end(self, full: str) -> None:
        name = self._name(full)
        text = "".join(self.data).strip() or None if self.data else None
        item = self.item
        self.item, self.data = self.stack.pop()
        if item is not None:
            if text:
                self._push(item, "#text", text)
            self.item = self._push(self.item, name, item)
        else:
            self.item = self._push(self.item, name, text)

    def chars(self, data: str) -> None:
        self.data.append(data)

    @staticmethod
    def _push(item: dict[str, Any] | None, key: str, value: Any) -> dict[str, Any]:
        if item is None:
            item = {}
        if key in item:
            old = item[key]
            if isinstance(old, list):
                old.append(value)
            else:
                item[key] = [old, value]
        else:
            item[key] = value
        return item


def _forbid_entities(*_args: Any) -> None:
    raise ValueError("entities are disabled")


def _to_dict(data: bytes) -> dict[str, Any] | None:
    b = _DictBuilder()
    parser = expat.ParserCreate(None, ":")
    parser.ordered_attributes = True
    parser.buffer_text = True
    parser.StartNamespaceDeclHandler = b.start_ns
    parser.StartElementHandler = b.start
    parser.EndElementHandler = b.end
    parser.CharacterDataHandler = b.chars
    parser.EntityDeclHandler = _forbid_entities
    parser.Parse(data, True)
    return b.item


def element_lines(data: bytes | str) -> dict[str, int]:
    """Map each element's XPath-like path (``/domain/devices/disk[2]``) to its line number.

    Only used to decorate error messages, so it runs only when something is wrong. The first
    element of a name is spelled without an index, later ones with [n] (1-based); lookups strip
    "[1]" from error paths to match.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", errors="replace")
    lines: dict[str, int] = {}
    stack: list[tuple[str, dict[str, int]]] = [("", {})]
    parser = expat.ParserCreate(namespace_separator=None)

    def start(name: str, _attrs: Any) -> None:
        parent_path, counts = stack[-1]
        n = counts.get(name, 0) + 1
        counts[name] = n
        path = f"{parent_path}/{name}" if n == 1 else f"{parent_path}/{name}[{n}]"
        lines.setdefault(path, parser.CurrentLineNumber)
        stack.append((path, {}))

    def end(_name: str) -> None:
        stack.pop()

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        parser.Parse(data, True)
    except (expat.ExpatError, RecursionError):
        pass
    return lines


def load_domain_dict(path: str | os.PathLike[str]) -> tuple[dict[str, Any], bytes]:
    """Read and parse a domain file; problems carry the file's name."""
    try:
        data = read_domain_bytes(path)
        return parse_xml(data), data
    except DomainError as exc:
        raise exc.with_file(str(Path(path))) from None
