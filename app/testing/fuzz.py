"""A structure-aware DICOM fuzzer: mutants of valid Part-10 files, deterministic from a seed.

The seeds are `app.testing.dicom_files` radiographs in every transfer syntax the service takes,
plus the rendering cases (LUT sequences, windows, padding, MONOCHROME1, signed pixels) that reach
the less travelled code. Each mutant is made by walking the file's elements (tag, VR, length,
value; items and delimiters of sequences; the offset table and fragments of encapsulated pixel
data; a deflated body is inflated, walked and deflated again) and changing one thing the way a
broken modality, a truncated transfer or a hostile client would:

    tag          an element's tag rewritten, duplicated, or two elements swapped
    vr           an explicit VR replaced by another VR or by garbage
    length       an element's length off by a little, by a lot, odd, or undefined
    undefined    a sequence or item made undefined-length, or its delimiter removed
    uid          the Transfer Syntax or SOP Class UID changed (a digit, another UID, garbage)
    sequence     an item tag or length broken, or a deeply nested sequence inserted
    fragments    the offset table, a fragment's length or contents broken, frames split or cut
    critical     Rows, Columns, Bits Allocated/Stored, High Bit, Pixel Representation,
                 Photometric Interpretation, Samples per Pixel, Number of Frames, rescale,
                 window, padding or a LUT descriptor set to a hostile value, or removed
    flip         a few bits flipped in the header
    truncate     the file cut at an element boundary or anywhere

Mutant `index` of `seed` is made from its own random generator (`Random(f"{seed}/{index}")`), so
any mutant can be rebuilt from its id alone, in any order: a crash found after a million mutants
is a two-number regression. The fuzzer never needs the service: `mutant` and `mutants` return
bytes, and the tests and `scripts/dev/fuzz.py` decide where to send them.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.datadict import dictionary_VR

from app.testing.dicom_files import SYNTAXES, make_dicom, ramp

PREFIX = 132  # preamble and "DICM"
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_VRS = [
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB",
    b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM",
    b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV",
]  # fmt: skip
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
TRANSFER_SYNTAX = 0x00020010
SOP_CLASS_TAGS = (0x00020002, 0x00080016)
GROUP_LENGTH = 0x00020000

# The values that decide how pixels are read, and what a hostile file would put there.
_NUMBERS = [0, 1, 2, 3, 7, 8, 9, 12, 15, 16, 17, 24, 32, 64, 255, 256, 4095, 32767, 32768, 65535]
Value = bytes | int | tuple[int, ...]
CRITICAL: dict[int, Sequence[Value]] = {
    0x00280010: _NUMBERS,  # Rows
    0x00280011: _NUMBERS,  # Columns
    0x00280100: _NUMBERS,  # Bits Allocated
    0x00280101: _NUMBERS,  # Bits Stored
    0x00280102: _NUMBERS,  # High Bit
    0x00280103: [0, 1, 2, 255, 65535],  # Pixel Representation
    0x00280002: [0, 1, 2, 3, 4, 65535],  # Samples per Pixel
    0x00280006: [0, 1, 2],  # Planar Configuration
    0x00280004: [
        b"RGB",
        b"YBR_FULL",
        b"YBR_FULL_422",
        b"PALETTE COLOR",
        b"MONOCHROME3",
        b"",
        b"\x00\xff",
        b"MONOCHROME1\\MONOCHROME2",
        b"monochrome2",
    ],  # Photometric Interpretation
    0x00280008: [b"0", b"2", b"-1", b"abc", b"99999999", b"1\\2", b""],  # Number of Frames
    0x00281052: [b"nan", b"inf", b"-inf", b"1e308", b"abc", b"", b"1\\2"],  # Rescale Intercept
    0x00281053: [b"0", b"nan", b"inf", b"-1e308", b"1e-320", b"x", b"1\\2"],  # Rescale Slope
    0x00281050: [b"nan", b"inf", b"1e308", b"-1e308", b"x", b"", b"1\\2\\3"],  # Window Center
    0x00281051: [b"0", b"-1", b"nan", b"inf", b"1e-320", b"x", b"1\\"],  # Window Width
    0x00281056: [b"SIGMOID", b"LINEAR_EXACT", b"BOGUS", b""],  # VOI LUT Function
    0x00280120: [0, 1, 32767, 65535],  # Pixel Padding Value
    0x00280121: [0, 1, 65535],  # Pixel Padding Range Limit
    0x00283002: [(0, 0, 0), (1, 0, 16), (65535, 65535, 65535), (4096, 0, 0), (3, 0, 17)],
    0x00080060: [b"CT", b"", b"DX\\CR", b"\x00\x00"],  # Modality
    0x00200020: [b"A\\P", b""],  # Patient Orientation (unused, but parsed)
}
_UIDS = [
    b"1.2.840.10008.1.2", b"1.2.840.10008.1.2.1", b"1.2.840.10008.1.2.2", b"1.2.840.10008.1.2.1.99",
    b"1.2.840.10008.1.2.4.50", b"1.2.840.10008.1.2.4.57", b"1.2.840.10008.1.2.4.70",
    b"1.2.840.10008.1.2.4.80", b"1.2.840.10008.1.2.4.90", b"1.2.840.10008.1.2.4.91",
    b"1.2.840.10008.1.2.5", b"1.2.840.10008.1.2.4.100", b"1.2.840.10008.1.2.4.201",
    b"1.2.840.10008.5.1.4.1.1.2", b"1.2.840.10008.5.1.4.1.1.1", b"1.2.840.10008.5.1.4.1.1.1.1",
    b"1.2.840.10008.1.3.10", b"", b"1.2.3", b"not a uid", b"1." * 40, b"\x00" * 8,
]  # fmt: skip


@dataclass(frozen=True)
class Element:
    """Where one element (or item, delimiter, fragment) of a data set lies in the bytes."""

    tag: int
    vr: bytes | None  # None for items, delimiters, fragments, and implicit VR
    start: int  # offset of the tag
    length_at: int
    length_size: int  # 2 or 4
    value_at: int
    length: int  # as declared; UNDEFINED for an undefined length
    kind: str  # "element" | "item" | "item_end" | "sequence_end" | "offset_table" | "fragment"
    # Enclosing elements and items with a defined length (their length fields include this one).
    parents: tuple[int, ...] = ()

    @property
    def end(self) -> int:
        """Offset just past the value (for a defined length)."""
        return self.value_at + (0 if self.length == UNDEFINED else self.length)


@dataclass
class Region:
    """A stretch of the file walked as elements in one encoding (the meta group, or the body)."""

    data: bytearray
    little: bool
    implicit: bool
    elements: list[Element] = field(default_factory=list)

    @property
    def endian(self) -> str:
        return "<" if self.little else ">"


class _Walker:
    def __init__(self, region: Region) -> None:
        self.r = region
        self.data = bytes(region.data)

    def u16(self, at: int) -> int:
        value: int = struct.unpack_from(self.r.endian + "H", self.data, at)[0]
        return value

    def u32(self, at: int) -> int:
        value: int = struct.unpack_from(self.r.endian + "I", self.data, at)[0]
        return value

    def tag(self, at: int) -> int:
        return (self.u16(at) << 16) | self.u16(at + 2)

    def add(self, element: Element) -> int:
        self.r.elements.append(element)
        return len(self.r.elements) - 1

    def dataset(self, at: int, end: int, parents: tuple[int, ...], until_item_end: bool) -> int:
        """Walk elements from `at` up to `end` (or an item delimiter); returns the offset after."""
        while at + 8 <= end:
            tag = self.tag(at)
            if tag == ITEM_END and until_item_end:
                self.add(Element(tag, None, at, at + 4, 4, at + 8, self.u32(at + 4), "item_end",
                                 parents))  # fmt: skip
                return at + 8
            at = self.element(at, parents)
        return at

    def element(self, at: int, parents: tuple[int, ...]) -> int:
        tag = self.tag(at)
        vr: bytes | None
        if self.r.implicit:
            vr, length_at, size = None, at + 4, 4
            try:
                sequence = dictionary_VR(tag) == "SQ"
            except KeyError:
                sequence = False
        else:
            vr = self.data[at + 4 : at + 6]
            length_at, size = (at + 8, 4) if vr in _LONG_VRS else (at + 6, 2)
            sequence = vr == b"SQ"
        length = self.u32(length_at) if size == 4 else self.u16(length_at)
        value_at = length_at + size
        index = self.add(
            Element(tag, vr, at, length_at, size, value_at, length, "element", parents)
        )
        inner = parents + ((index,) if length != UNDEFINED else ())
        if tag == PIXEL_DATA and length == UNDEFINED:
            return self.fragments(value_at, inner)
        if sequence or (vr == b"UN" and length == UNDEFINED):
            return self.items(value_at, None if length == UNDEFINED else value_at + length, inner)
        if length == UNDEFINED:
            raise ValueError("an undefined length outside a sequence")
        return value_at + length

    def items(self, at: int, end: int | None, parents: tuple[int, ...]) -> int:
        while at + 8 <= (end if end is not None else len(self.data)):
            tag, length = self.tag(at), self.u32(at + 4)
            if tag == SEQUENCE_END:
                self.add(Element(tag, None, at, at + 4, 4, at + 8, length, "sequence_end", parents))
                return at + 8
            if tag != ITEM:
                raise ValueError("not an item in a sequence")
            index = self.add(Element(tag, None, at, at + 4, 4, at + 8, length, "item", parents))
            if length == UNDEFINED:
                at = self.dataset(at + 8, len(self.data), parents, until_item_end=True)
            else:
                at = self.dataset(at + 8, at + 8 + length, (*parents, index), False)
        return at

    def fragments(self, at: int, parents: tuple[int, ...]) -> int:
        kind = "offset_table"
        while at + 8 <= len(self.data):
            tag, length = self.tag(at), self.u32(at + 4)
            if tag == SEQUENCE_END:
                self.add(Element(tag, None, at, at + 4, 4, at + 8, length, "sequence_end", parents))
                return at + 8
            self.add(Element(tag, None, at, at + 4, 4, at + 8, length, kind, parents))
            kind = "fragment"
            at += 8 + length
        return at


@dataclass
class Layout:
    """A Part-10 file split into its walked meta group and body (inflated if deflated)."""

    prefix: bytes
    meta: Region
    body: Region
    deflated: bool

    @classmethod
    def parse(cls, data: bytes) -> Layout:
        if data[128:132] != b"DICM":
            raise ValueError("not Part 10")
        at = PREFIX
        # The meta group is explicit VR little endian, group 0002 only.
        while at + 8 <= len(data) and struct.unpack_from("<H", data, at)[0] == 2:
            vr = data[at + 4 : at + 6]
            if vr in _LONG_VRS:
                at += 12 + struct.unpack_from("<I", data, at + 8)[0]
            else:
                at += 8 + struct.unpack_from("<H", data, at + 6)[0]
        meta = Region(bytearray(data[PREFIX:at]), little=True, implicit=False)
        _Walker(meta).dataset(0, len(meta.data), (), False)
        syntax = _value(meta, TRANSFER_SYNTAX).rstrip(b"\x00 ").decode("ascii", "replace")
        deflated = syntax == "1.2.840.10008.1.2.1.99"
        body_bytes = data[at:]
        if deflated:
            body_bytes = zlib.decompress(body_bytes, -zlib.MAX_WBITS)
        body = Region(
            bytearray(body_bytes),
            little=syntax != "1.2.840.10008.1.2.2",
            implicit=syntax == "1.2.840.10008.1.2",
        )
        _Walker(body).dataset(0, len(body.data), (), False)
        return cls(data[:PREFIX], meta, body, deflated)

    def to_bytes(self) -> bytes:
        body = bytes(self.body.data)
        if self.deflated:
            packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            body = packer.compress(body) + packer.flush()
        return self.prefix + bytes(self.meta.data) + body

    def regions(self) -> tuple[Region, Region]:
        return self.meta, self.body


def _value(region: Region, tag: int) -> bytes:
    element = next((e for e in region.elements if e.tag == tag and e.kind == "element"), None)
    if element is None or element.length == UNDEFINED:
        return b""
    return bytes(region.data[element.value_at : element.end])


def _find(layout: Layout, tag: int) -> tuple[Region, Element] | None:
    for region in layout.regions():
        for element in region.elements:
            if element.tag == tag and element.kind == "element":
                return region, element
    return None


def _pack_length(region: Region, element: Element, length: int) -> bytes:
    if element.length_size == 2:
        return struct.pack(region.endian + "H", length & 0xFFFF)
    return struct.pack(region.endian + "I", length & 0xFFFFFFFF)


def _set_length(region: Region, element: Element, length: int) -> None:
    region.data[element.length_at : element.length_at + element.length_size] = _pack_length(
        region, element, length
    )


def _splice(layout: Layout, region: Region, start: int, end: int, new: bytes,
            parents: tuple[int, ...], fix_lengths: bool = True) -> None:  # fmt: skip
    """Replace region bytes [start, end) with `new`, keeping the enclosing defined lengths (and
    the meta group's length) right unless `fix_lengths` is False."""
    delta = len(new) - (end - start)
    region.data[start:end] = new
    if not fix_lengths or delta == 0:
        return
    for index in parents:
        parent = region.elements[index]
        if parent.length != UNDEFINED and parent.length_at < start:
            _set_length(region, parent, parent.length + delta)
    if region is layout.meta:
        group = next((e for e in region.elements if e.tag == GROUP_LENGTH), None)
        if group is not None and group.start < start and group.length == 4:
            old = struct.unpack_from("<I", region.data, group.value_at)[0]
            struct.pack_into("<I", region.data, group.value_at, (old + delta) & 0xFFFFFFFF)


def _set_value(layout: Layout, region: Region, element: Element, value: bytes,
               pad: bytes = b" ") -> None:  # fmt: skip
    if len(value) % 2:
        value += pad
    if element.length_size == 2 and len(value) > 0xFFFF:
        value = value[:0xFFFE]
    head = bytearray(region.data[element.start : element.value_at])
    head[element.length_at - element.start :] = _pack_length(region, element, len(value))
    end = element.end if element.length != UNDEFINED else element.value_at
    _splice(layout, region, element.start, end, bytes(head) + value, element.parents)


def _encode_number(region: Region, element: Element, value: bytes | int | tuple[int, ...]) -> bytes:
    if isinstance(value, bytes):
        return value
    vr = element.vr or dictionary_vr_bytes(element.tag)
    values = value if isinstance(value, tuple) else (value,)
    if vr in (b"US", b"SS", b"OW", b"xs"):
        code = "h" if vr == b"SS" else "H"
        return b"".join(struct.pack(region.endian + code, v & 0xFFFF) for v in values)
    if vr in (b"UL", b"SL"):
        return b"".join(struct.pack(region.endian + "I", v & 0xFFFFFFFF) for v in values)
    return "\\".join(str(v) for v in values).encode()


def dictionary_vr_bytes(tag: int) -> bytes:
    try:
        return dictionary_VR(tag).split(" ")[0].encode()
    except KeyError:
        return b"UN"


# -- the operators -------------------------------------------------------------------------------

Operator = Callable[[Layout, random.Random], bool]  # edits the layout; False: not applicable


def _pick(
    rng: random.Random,
    layout: Layout,
    kinds: tuple[str, ...] = ("element",),
    where: Callable[[Element], bool] = lambda e: True,
) -> tuple[Region, Element] | None:
    candidates = [
        (region, element)
        for region in layout.regions()
        for element in region.elements
        if element.kind in kinds and where(element)
    ]
    return rng.choice(candidates) if candidates else None


def op_tag(layout: Layout, rng: random.Random) -> bool:
    picked = _pick(rng, layout)
    if picked is None:
        return False
    region, element = picked
    choice = rng.random()
    if choice < 0.4:  # a random tag (maybe private, maybe group 0002 in the body)
        group = rng.choice([0x0002, 0x0008, 0x0009, 0x0028, 0x7FE0, 0xFFFE, rng.randrange(65536)])
        tag = (group << 16) | rng.randrange(65536)
    elif choice < 0.7:  # a copy of another element's tag: a duplicate, out of order
        tag = rng.choice(region.elements).tag
    else:  # swap with the next top-level element
        siblings = [
            e for e in region.elements if e.parents == element.parents and e.kind == "element"
        ]
        later = [e for e in siblings if e.start > element.start]
        if not later or element.length == UNDEFINED or later[0].length == UNDEFINED:
            return False
        nxt = later[0]
        first = bytes(region.data[element.start : nxt.start])
        second = bytes(region.data[nxt.start : nxt.end])
        region.data[element.start : nxt.end] = second + first
        return True
    region.data[element.start : element.start + 4] = struct.pack(
        region.endian + "HH", tag >> 16, tag & 0xFFFF
    )
    return True


def op_vr(layout: Layout, rng: random.Random) -> bool:
    picked = _pick(rng, layout, where=lambda e: e.vr is not None)
    if picked is None:
        return False
    region, element = picked
    roll = rng.random()
    if roll < 0.6:
        vr = rng.choice(_VRS)
    elif roll < 0.8:
        vr = bytes(rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(2))
    else:
        vr = rng.choice([b"\x00\x00", b"  ", b"ui", b"\xff\xff", b"Q\x00"])
    region.data[element.start + 4 : element.start + 6] = vr
    return True


def _interesting_length(rng: random.Random, element: Element, size: int) -> int:
    length = 0 if element.length == UNDEFINED else element.length
    top = 0xFFFF if size == 2 else 0xFFFFFFFF
    return rng.choice([
        0, 1, 2, length + 1, length - 1, length + 2, max(length - 2, 0), length * 2, length // 2,
        top, top - 1, 0x7FFFFFFF & top, 0x8000 if size == 2 else 0x80000000,
        rng.randrange(top + 1),
    ]) & top  # fmt: skip


def op_length(layout: Layout, rng: random.Random) -> bool:
    picked = _pick(rng, layout, kinds=("element", "item", "offset_table", "fragment"))
    if picked is None:
        return False
    region, element = picked
    _set_length(region, element, _interesting_length(rng, element, element.length_size))
    return True


def op_undefined(layout: Layout, rng: random.Random) -> bool:
    roll = rng.random()
    if roll < 0.5:  # remove a delimiter (a sequence or item that never ends)
        picked = _pick(rng, layout, kinds=("item_end", "sequence_end"))
        if picked is not None:
            region, element = picked
            del region.data[element.start : element.start + 8]
            return True
    # an undefined length where a defined one was (on an element that may not take one)
    picked = _pick(rng, layout, kinds=("element", "item"),
                   where=lambda e: e.length != UNDEFINED and e.length_size == 4)  # fmt: skip
    if picked is None:
        picked = _pick(rng, layout, where=lambda e: e.length != UNDEFINED)
        if picked is None:
            return False
    region, element = picked
    _set_length(region, element, UNDEFINED)
    return True


def op_uid(layout: Layout, rng: random.Random) -> bool:
    tag = TRANSFER_SYNTAX if rng.random() < 0.6 else rng.choice(SOP_CLASS_TAGS)
    found = _find(layout, tag)
    if found is None:
        return False
    region, element = found
    value = bytes(region.data[element.value_at : element.end]).rstrip(b"\x00 ")
    roll = rng.random()
    if roll < 0.4 and value:  # one digit changed (the length stays)
        digits = [i for i, c in enumerate(value) if chr(c).isdigit()]
        position = rng.choice(digits)
        changed = bytearray(value)
        changed[position] = rng.choice([c for c in b"0123456789" if c != value[position]])
        _set_value(layout, region, element, bytes(changed), b"\x00")
    elif roll < 0.8:
        _set_value(layout, region, element, rng.choice(_UIDS), b"\x00")
    else:  # garbage of the same length
        _set_value(layout, region, element, bytes(rng.randrange(256) for _ in value), b"\x00")
    return True


def _nested_sequence(region: Region, depth: int, defined: bool) -> bytes:
    """`depth` sequences, each in an item of the one above (Referenced Image Sequence)."""
    e = region.endian
    if region.implicit:
        head = struct.pack(e + "HHI", 0x0008, 0x1140, UNDEFINED)
    else:
        head = (
            struct.pack(e + "HH", 0x0008, 0x1140) + b"SQ\x00\x00" + struct.pack(e + "I", UNDEFINED)
        )
    item = struct.pack(e + "HHI", 0xFFFE, 0xE000, UNDEFINED)
    item_end = struct.pack(e + "HHI", 0xFFFE, 0xE00D, 0)
    sequence_end = struct.pack(e + "HHI", 0xFFFE, 0xE0DD, 0)
    inner = b""
    for _ in range(depth):
        inner = head + item + inner + item_end + sequence_end
    return inner if defined else inner[: len(inner) // 2]  # cut: delimiters missing


def op_sequence(layout: Layout, rng: random.Random) -> bool:
    roll = rng.random()
    picked = _pick(rng, layout, kinds=("item", "item_end", "sequence_end"))
    if roll < 0.5 and picked is not None:
        region, element = picked
        if rng.random() < 0.5:  # the item tag broken
            tag = rng.choice([0xFFFEE00D, 0xFFFEE0DD, 0xFFFEE001, 0x00080018, 0xFFFFFFFF])
            region.data[element.start : element.start + 4] = struct.pack(
                region.endian + "HH", tag >> 16, tag & 0xFFFF
            )
        else:
            _set_length(region, element, _interesting_length(rng, element, 4))
        return True
    # a nested sequence inserted before an element of the body (the tag order is then wrong too)
    region = layout.body
    anchors = [e for e in region.elements if e.kind == "element" and not e.parents]
    if not anchors:
        return False
    anchor = rng.choice(anchors)
    depth = rng.choice([1, 2, 8, 64, 300, 2000])
    nested = _nested_sequence(region, depth, defined=rng.random() < 0.7)
    _splice(layout, region, anchor.start, anchor.start, nested, ())
    return True


def op_fragments(layout: Layout, rng: random.Random) -> bool:
    region = layout.body
    table = next((e for e in region.elements if e.kind == "offset_table"), None)
    frames = [e for e in region.elements if e.kind == "fragment"]
    if table is None or not frames:
        return False
    roll = rng.randrange(8)
    frame = rng.choice(frames)
    e = region.endian
    if roll == 0:  # offsets table of a length that is no multiple of 4, or absurd offsets
        offsets = struct.pack(e + "II", rng.randrange(2**32), rng.randrange(2**32))
        cut = rng.choice([3, 4, 5, 8])
        _splice(layout, region, table.value_at, table.end, offsets[:cut], (), False)
        _set_length(region, table, cut)
    elif roll == 1:  # the fragment's length, off
        _set_length(region, frame, _interesting_length(rng, frame, 4))
    elif roll == 2:  # the fragment's contents cut, its length kept right
        keep = rng.randrange(max(frame.length, 1))
        region.data[frame.value_at + keep : frame.end] = b""
        _set_length(region, frame, keep)
    elif roll == 3:  # the fragment's contents cut, its length left as it was (the file ends)
        del region.data[frame.value_at + rng.randrange(max(frame.length, 1)) :]
    elif roll == 4:  # split in two fragments
        if frame.length < 4:
            return False
        half = (frame.length // 2) & ~1
        item = struct.pack(e + "HHI", 0xFFFE, 0xE000, frame.length - half)
        region.data[frame.value_at + half : frame.value_at + half] = item
        _set_length(region, frame, half)
    elif roll == 5:  # a second frame (a copy), or an empty one
        copy = bytes(region.data[frame.start : frame.end]) if rng.random() < 0.5 else b""
        empty = struct.pack(e + "HHI", 0xFFFE, 0xE000, 0)
        region.data[frame.end : frame.end] = copy or empty
    elif roll == 6:  # the sequence delimiter removed, or the item tag broken
        ends = [x for x in region.elements if x.kind == "sequence_end" and x.start > frame.start]
        end = ends[0] if ends else None
        if end is not None and rng.random() < 0.5:
            del region.data[end.start : end.start + 8]
        else:
            region.data[frame.start : frame.start + 4] = struct.pack(
                e + "HH", 0xFFFE, rng.choice([0xE00D, 0xE0DD, 0x0000, 0xE001])
            )
    else:  # a codestream's markers broken: bytes flipped near its start or its end
        if frame.length < 4:
            return False
        for _ in range(rng.randint(1, 4)):
            span = min(frame.length, 64)
            offset = (
                rng.randrange(span)
                if rng.random() < 0.6
                else frame.length - 1 - rng.randrange(span)
            )
            region.data[frame.value_at + offset] ^= 1 << rng.randrange(8)
    return True


def op_critical(layout: Layout, rng: random.Random) -> bool:
    present = [(tag, found) for tag in CRITICAL if (found := _find(layout, tag)) is not None]
    if not present:
        return False
    tag, (region, element) = rng.choice(present)
    if rng.random() < 0.15:  # removed altogether
        _splice(layout, region, element.start, element.end, b"", element.parents)
        return True
    value = rng.choice(CRITICAL[tag])
    _set_value(layout, region, element, _encode_number(region, element, value))
    return True


OPERATORS: dict[str, Operator] = {
    "tag": op_tag,
    "vr": op_vr,
    "length": op_length,
    "undefined": op_undefined,
    "uid": op_uid,
    "sequence": op_sequence,
    "fragments": op_fragments,
    "critical": op_critical,
}
# Byte-level operators work on the final file (a deflated body stays deflated).
RAW_OPERATORS = ("flip", "truncate")
WEIGHTS: dict[str, int] = {
    "tag": 8, "vr": 10, "length": 12, "undefined": 6, "uid": 8, "sequence": 6, "fragments": 20,
    "critical": 20, "flip": 10, "truncate": 8,
}  # fmt: skip


def _flip(data: bytes, layout: Layout | None, rng: random.Random) -> bytes:
    """1 to 4 bit flips in the header (before the pixel data's value)."""
    out = bytearray(data)
    end = len(out)
    if layout is not None and not layout.deflated:
        pixel = next((e for e in layout.body.elements if e.tag == PIXEL_DATA), None)
        if pixel is not None:
            end = PREFIX + len(layout.meta.data) + pixel.value_at + 16
    if len(out) <= PREFIX:
        return bytes(out)
    for _ in range(rng.randint(1, 4)):
        position = rng.randrange(PREFIX, max(min(end, len(out)), PREFIX + 1))
        out[position] ^= 1 << rng.randrange(8)
    return bytes(out)


def _truncate(data: bytes, layout: Layout | None, rng: random.Random) -> bytes:
    if layout is not None and not layout.deflated and rng.random() < 0.6:
        base = PREFIX + len(layout.meta.data)
        starts = [PREFIX + e.start for e in layout.meta.elements]
        starts += [base + e.start for e in layout.body.elements]
        starts += [base + e.value_at for e in layout.body.elements]
        if not starts:
            return data[:PREFIX]
        return data[: max(PREFIX, rng.choice(starts) + rng.choice([-2, -1, 0, 0, 1, 2, 4]))]
    return data[: rng.randrange(PREFIX, max(len(data), PREFIX + 1))]


@dataclass(frozen=True)
class Mutant:
    """One fuzzed file: which seed file, which mutant of which run seed, and how it was made."""

    seed: int
    index: int
    source: str  # the seed file's name in `seed_files()`
    operators: tuple[str, ...]
    data: bytes

    @property
    def id(self) -> str:
        return f"{self.seed}/{self.index}"


def mutant(seeds: Mapping[str, bytes], seed: int, index: int) -> Mutant:
    """Mutant `index` of run `seed` (the same bytes every time, whatever else was made)."""
    rng = random.Random(f"{seed}/{index}")
    source = rng.choice(sorted(seeds))
    data = seeds[source]
    applied: list[str] = []
    names = list(WEIGHTS)
    weights = [WEIGHTS[n] for n in names]
    # Mostly one change (each is then what broke the file); sometimes two or three stacked.
    for _ in range(rng.choices([1, 2, 3], [70, 22, 8])[0]):
        name = rng.choices(names, weights)[0]
        try:
            layout: Layout | None = Layout.parse(data)
        except Exception:  # an earlier change broke the structure: bytes only from here
            layout = None
        if name in RAW_OPERATORS or layout is None:
            name = name if name in RAW_OPERATORS else rng.choice(RAW_OPERATORS)
            data = (_flip if name == "flip" else _truncate)(data, layout, rng)
        else:
            try:
                applicable = OPERATORS[name](layout, rng)
            except (IndexError, ValueError, struct.error):  # a layout an earlier change broke
                applicable = False
            if applicable:
                data = layout.to_bytes()
            else:
                name = "flip"
                data = _flip(data, layout, rng)
        applied.append(name)
    return Mutant(seed, index, source, tuple(applied), data)


def mutants(seeds: Mapping[str, bytes], seed: int, count: int, start: int = 0) -> Iterator[Mutant]:
    """Mutants `start` .. `start + count - 1` of run `seed`."""
    for index in range(start, start + count):
        yield mutant(seeds, seed, index)


def seed_files(rows: int = 96, columns: int = 80) -> dict[str, bytes]:
    """Valid radiographs to mutate: every transfer syntax, and the rendering cases."""
    stored = ramp(rows, columns)
    eight = ramp(rows, columns, high=255, dtype=np.uint8)
    files = {
        # baseline JPEG holds 8-bit samples only
        f"ramp_{syntax}": make_dicom(
            (eight if syntax == "jpeg_baseline" else stored).copy(), syntax
        )
        for syntax in SYNTAXES
    }
    signed = (stored.astype(np.int32) - 2048).astype(np.int16)
    lut = list(range(0, 4096, 16))
    cases = {
        "voi_lut": dict(voi_lut=(0, 12, [v * 16 for v in range(256)])),
        "modality_lut": dict(modality_lut=(0, 12, lut)),
        "window_sigmoid": dict(window=([1500.0, 2500.0], [1000.0, 2000.0]), voi_function="SIGMOID"),
        "padding_monochrome1": dict(
            padding=(0, 10), photometric="MONOCHROME1", rescale=(2.0, -5.0)
        ),
        "inverse": dict(presentation_inverse=True, bits_stored=12, extra={"NumberOfFrames": "1"}),
    }
    for name, options in cases.items():
        for syntax in ("explicit_le", "implicit_le", "explicit_be"):
            files[f"{name}_{syntax}"] = make_dicom(stored.copy(), syntax, **options)  # type: ignore[arg-type]
    files["signed_explicit_le"] = make_dicom(signed, "explicit_le", rescale=(1.0, 2048.0))
    files["signed_rle"] = make_dicom(signed, "rle")
    files["eight_bit_jpeg_ls"] = make_dicom(eight, "jpeg_ls")
    files["eight_bit_explicit_le"] = make_dicom(eight, "explicit_le", window=(128.0, 200.0))
    return files
