"""qemud's XML-to-dict reader (``qemud.xmlload``) builds exactly what xmltodict built before it.

The domain models read xmltodict's dict shape; qemud reads it with its own small expat handler
(importing xmltodict cost ~10 ms of every daemon start). These tests hold the two to the same
output, on every domain XML at hand and on the corner cases of the shape: repeated children,
text beside children, whitespace, namespaces and their declarations, CDATA, entities.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import xmltodict
from xml.parsers import expat

from qemud.errors import DomainError
from qemud.xmlload import NAMESPACES, _to_dict, parse_xml

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "libvirt-corpus"
if not CORPUS.is_dir():  # a worktree next to main: the corpus is beside the main checkout
    CORPUS = Path("/work/shared/libvirt-corpus")


def _reference(data: bytes):  # type: ignore[no-untyped-def]
    return xmltodict.parse(data, process_namespaces=True, namespaces=NAMESPACES,
                           disable_entities=True, process_comments=False)


def _files() -> list[Path]:
    files = sorted((ROOT / "tests" / "data").rglob("*.xml")) + sorted(CORPUS.glob("*.xml"))
    return files


def test_there_are_files_to_compare() -> None:
    files = _files()
    assert len([f for f in files if f.parent == CORPUS]) > 500, f"libvirt's corpus missing at {CORPUS}"
    assert len(files) > 550


def test_every_domain_file_reads_the_same() -> None:
    differ = []
    for f in _files():
        data = f.read_bytes()
        try:
            want = _reference(data)
        except (expat.ExpatError, ValueError) as exc:
            want = type(exc)
        try:
            got = _to_dict(data)
        except (expat.ExpatError, ValueError) as exc:
            got = type(exc)
        if got != want:
            differ.append(f.name)
    assert differ == []


CASES = [
    b"<domain/>",
    b"<domain>text</domain>",
    b"<domain>  padded \n </domain>",
    b"<domain>   </domain>",
    b"<domain a='1' b=''/>",
    b"<domain a='1'>t</domain>",
    b"<domain><x/><x/><x>3</x><y a='b'/></domain>",
    b"<domain><x>1</x><y/><x>2</x></domain>",
    b"<domain>before<x/>after</domain>",
    b"<domain>one<![CDATA[ <two> ]]>three</domain>",
    b"<domain>&lt;&amp;&#65;</domain>",
    b"<domain><n>a</n><n><m/></n><n k='v'>t</n></domain>",
    b"<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
    b"<qemu:commandline><qemu:arg value='-x'/><qemu:arg value='-y'/></qemu:commandline></domain>",
    b"<domain><metadata><qemud:settings xmlns:qemud='http://qemud.org/xmlns/domain/1.0'>"
    b"<qemud:restart policy='always'/></qemud:settings>"
    b"<app:x xmlns:app='http://example.org/app' app:attr='1'>v</app:x></metadata></domain>",
    b"<domain xmlns='http://example.org/default'><name>d</name></domain>",
    b"<domain><devices xmlns:a='urn:a' xmlns:b='urn:b' k='1'/></domain>",
    b"<?xml version='1.0' encoding='UTF-8'?>\n<!-- c --><domain><?pi x?><name>\xc3\xa9</name></domain>",
    b"<?xml version='1.0' encoding='ISO-8859-1'?><domain><name>\xe9</name></domain>",
    b"<domain><a><b><c><d>deep</d></c></b></a></domain>",
    b"<domain><x>1</x><x>2</x><x>3</x></domain>",
]


@pytest.mark.parametrize("data", CASES, ids=range(len(CASES)))
def test_corner_cases_read_the_same(data: bytes) -> None:
    assert _to_dict(data) == _reference(data)


def test_entity_declarations_are_refused_as_before() -> None:
    data = b"<!DOCTYPE d [<!ENTITY e 'x'>]><domain>&e;</domain>"
    with pytest.raises(ValueError, match="entities"):
        _reference(data)
    with pytest.raises(DomainError) as exc:
        parse_xml(data)
    assert "entity declarations are not allowed" in str(exc.value)


@pytest.mark.parametrize("data", [b"<domain>", b"<domain></other>", b"<a/><b/>", b"<domain a='1' a='2'/>"])
def test_malformed_xml_fails_at_the_same_place(data: bytes) -> None:
    with pytest.raises(expat.ExpatError) as ref:
        _reference(data)
    with pytest.raises(expat.ExpatError) as got:
        _to_dict(data)
    assert (got.value.code, got.value.lineno, got.value.offset) == (ref.value.code, ref.value.lineno, ref.value.offset)
