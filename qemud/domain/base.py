"""The building blocks of the domain model.

The models read xmltodict's dict shape directly: an attribute ``bus`` is the key ``@bus``, the
text of an element is ``#text``, a child element is its tag.  Field aliases are exactly those
keys, so a pydantic error location *is* the element's path in the file
(``devices, disk, 1, target, @bus`` -> ``/domain/devices/disk[2]/target/@bus``).

Every model forbids what it does not know: libvirt drops unknown elements silently, qemud names
them.  Elements that have no effect on the guest's hardware are declared with :func:`ignored` and
reported as warnings instead.

The modules of qemud.domain do not use ``from __future__ import annotations``: with it pydantic
has to compile and evaluate every field's annotation string at import (about 15 ms of the
daemon's start for ~250 models); evaluated by Python as the class body runs, they cost nothing.
"""

import re
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      model_validator)
from pydantic_core import PydanticCustomError

from qemud.errors import Problem

T = TypeVar("T")


def _holds_model(annotation: Any) -> bool:
    """Whether a field's type is (or contains) an element model."""
    import typing
    if isinstance(annotation, type):
        return issubclass(annotation, BaseModel)
    return any(_holds_model(a) for a in typing.get_args(annotation))


class _Attr:
    """What :func:`attr` returns: the field's arguments, kept until :meth:`Element.__init_subclass__`
    knows the field's name and so its ``@name`` alias."""

    __slots__ = ("default", "name", "kw")

    def __init__(self, default: Any, name: str, kw: dict[str, Any]) -> None:
        self.default, self.name, self.kw = default, name, kw


class Element(BaseModel):
    """One XML element: frozen, strict about what it contains."""

    _element_children: ClassVar[frozenset[str]] = frozenset()

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=False,
                              hide_input_in_errors=False, defer_build=True)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Turn each :func:`attr` into a pydantic field with its ``@name`` alias.  This runs before
        pydantic collects the fields, so the alias is there from the start: setting it afterwards
        needed a ``model_rebuild``, which builds the schema and validator of every model at import
        (``defer_build`` notwithstanding) and made importing qemud.domain cost 150 ms."""
        for fname, value in list(vars(cls).items()):
            if isinstance(value, _Attr):
                alias = "@" + (value.name or fname.rstrip("_"))
                setattr(cls, fname, Field(value.default, alias=alias,
                                          json_schema_extra={"xml_attr": value.name}, **value.kw))
        super().__init_subclass__(**kwargs)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        changed = False
        for fname, finfo in cls.model_fields.items():
            if isinstance(finfo.default, _Attr) or any(isinstance(m, _Attr) for m in finfo.metadata):
                raise TypeError(f"{cls.__qualname__}.{fname}: attr() must be the field's default "
                                "(name: T = attr(...)), not inside Annotated[...]")
            # a Field(json_schema_extra={"xml_attr": ...}) written out by hand: aliased the slow
            # way (a rebuild), so that it still reads its attribute
            extra = finfo.json_schema_extra
            if isinstance(extra, dict) and "xml_attr" in extra:
                alias = "@" + (str(extra["xml_attr"]) or fname.rstrip("_"))
                if finfo.alias != alias:
                    finfo.alias = finfo.validation_alias = finfo.serialization_alias = alias
                    changed = True
        if changed:
            cls.model_rebuild(force=True)
        # children that are elements: an empty one (<readonly/>) arrives as None and means
        # "present, no content", not "absent"
        cls._element_children = frozenset(
            (f.alias or n) for n, f in cls.model_fields.items()
            if not (f.alias or n).startswith(("@", "#")) and _holds_model(f.annotation))

    @model_validator(mode="before")
    @classmethod
    def _normalize(cls, data: Any) -> Any:
        if data is None:  # <readonly/>
            return {}
        if isinstance(data, str):  # <name>foo</name>
            return {"#text": data}
        if isinstance(data, dict):
            kids = cls._element_children
            if "@xmlns" in data or any(v is None and k in kids for k, v in data.items()):
                data = {k: ({} if v is None and k in kids else v) for k, v in data.items() if k != "@xmlns"}
        return data


class Opaque(Element):
    """An element whose content qemud keeps without reading it (``<metadata>`` children, and
    sub-elements declared with :func:`ignored`)."""

    model_config = ConfigDict(extra="allow")


def attr(default: Any = None, name: str = "", **kw: Any) -> Any:
    """A field read from an XML attribute: ``@`` + ``name`` (default: the field's name without a
    trailing underscore)."""
    return _Attr(default, name, kw)


def child(tag: str, default: Any = None, **kw: Any) -> Any:
    """A child element whose tag is not a Python identifier (``suspend-to-disk``, ``qemu:arg``)."""
    return Field(default, alias=tag, **kw)


def text(default: Any = None, **kw: Any) -> Any:
    return Field(default, alias="#text", **kw)


def ignored(reason: str, **kw: Any) -> Any:
    """An element qemud accepts and does not act on, because it does not change the guest's
    hardware; ``qemuctl validate`` reports it as a warning with ``reason``."""
    return Field(None, json_schema_extra={"qemud_ignored": reason}, **kw)


def _listify(v: Any) -> Any:
    if v is None:
        return ()
    if isinstance(v, (list, tuple)):
        return tuple(v)
    return (v,)


#: A repeated child element: always a tuple, whether the file has zero, one or many.
Many = Annotated[tuple[T, ...], BeforeValidator(_listify), Field(default=())]

_YES = {"yes": True, "on": True, "no": False, "off": False}


def _yesno(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip() in _YES:
        return _YES[v.strip()]
    raise PydanticCustomError("qemud_value", "'{value}' is not one of yes, no", {"value": v})


YesNo = Annotated[bool, BeforeValidator(_yesno)]

_INT = re.compile(r"[+]?[0-9]+\Z")
_HEX = re.compile(r"0[xX][0-9a-fA-F]+\Z")


def _uint(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    if isinstance(v, str):
        s = v.strip()
        if _INT.match(s):
            return int(s)
        if _HEX.match(s):
            return int(s, 16)
    raise PydanticCustomError("qemud_value", "'{value}' is not a non-negative integer", {"value": v})


#: A non-negative integer in decimal or 0x-hexadecimal, as libvirt reads them.
UInt = Annotated[int, BeforeValidator(_uint)]


# ---- turning pydantic errors into qemud problems ---------------------------------------------

def loc_to_path(loc: tuple[Any, ...], root: str = "domain") -> str:
    path = f"/{root}"
    for part in loc:
        if isinstance(part, int):
            path += f"[{part + 1}]"
        elif part == "#text":
            continue
        elif isinstance(part, str) and part.startswith("@"):
            path += f"/{part}"
        elif isinstance(part, str) and ("[" in part or "(" in part):
            continue  # a validator's name, not a place in the file
        else:
            path += f"/{part}"
    return path


def _describe(err: dict[str, Any]) -> str:
    kind = err["type"]
    value = err.get("input")
    loc = err["loc"]
    last = next((p for p in reversed(loc) if isinstance(p, str) and "[" not in p), "")
    is_attr = isinstance(last, str) and last.startswith("@")
    if kind == "extra_forbidden":
        if is_attr:
            return f"attribute '{last[1:]}' is not supported by qemud here (refused rather than silently dropped)"
        return f"element <{last}> is not supported by qemud here (refused rather than silently dropped)"
    if kind == "missing":
        if loc and loc[-1] == "#text":
            return "the element is empty; it needs a value"
        return "required attribute is missing" if is_attr else "required element is missing"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        choices = expected.replace("'", "").replace(" or ", ", ")
        return f"'{value}' is not one of {choices}"
    if kind in ("int_parsing", "int_type"):
        return f"'{value}' is not an integer"
    if kind in ("string_type",):
        return "must be text, not an element" if isinstance(value, dict) else "must be text"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"unexpected content {value!r}"
    if kind == "tuple_type":
        return "unexpected content"
    msg = err.get("msg", kind)
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg


def problems_from(exc: ValidationError, root: str = "domain") -> list[Problem]:
    out: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for err in exc.errors(include_url=False):
        path = loc_to_path(err["loc"], root)
        msg = _describe(err)
        if (path, msg) not in seen:
            seen.add((path, msg))
            out.append(Problem(path, msg))
    return out


def walk_ignored(model: BaseModel, path: str) -> Iterator[tuple[str, str]]:
    """Yield (path, reason) for every element set in the file that qemud accepts but ignores."""
    for fname, finfo in type(model).model_fields.items():
        value = getattr(model, fname)
        if value is None or value == ():
            continue
        alias = finfo.alias or fname
        if alias.startswith("@"):
            continue
        extra = finfo.json_schema_extra
        if isinstance(extra, dict) and "qemud_ignored" in extra:
            yield f"{path}/{alias}", str(extra["qemud_ignored"])
            continue
        if isinstance(value, BaseModel):
            yield from walk_ignored(value, f"{path}/{alias}")
        elif isinstance(value, tuple):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from walk_ignored(item, f"{path}/{alias}[{i + 1}]")
