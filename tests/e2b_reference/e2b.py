#!/usr/bin/python3
"""E2B's template-storage formats, read and written in Python for lazyblock's tests.

A second implementation of E2B's header versions 3, 4 and 5 and of its
compressed data files, derived from E2B's Go code (the header and storage
packages of its orchestrator) independently of lazyblock's C++, so that each
checks the other. It reads as leniently as E2B itself does (the checks E2B
makes, no more), and writes what E2B writes.

A store is a directory; build B's device NAME is the objects
    B/NAME.header                       the header
    B/NAME | B/NAME.zstd | B/NAME.lz4   the data file (by codec)
    B/NAME.zstd.uncompressed-size       the uncompressed size, in decimal,
                                        beside a compressed data file (as
                                        E2B's file-system store keeps it)

Commands (run with /usr/bin/python3, which has Debian's python3-lz4 and
python3-zstandard):
    e2b.py write --store DIR --build UUID [--parent UUID] --name NAME
                 --block-size 4096|2MiB --codec none|zstd|lz4 --version 3|4|5
                 [--frame-size 2MiB] IMAGE
    e2b.py read  --store DIR --build UUID --name NAME -o OUT
                                     the device, checking every data file it
                                     reads against the size and SHA-256 its
                                     own header records and every frame
                                     against its table (exit 1 if not)
    e2b.py dump  HEADER...           the header as JSON on stdout (several
                                     headers: a JSON array of them, in order)
    e2b.py encode JSON HEADER...     headers from JSON shaped as dump prints
                                     them, in pairs of JSON file and header file
"""

import argparse
import dataclasses
import hashlib
import json
import os
import struct
import sys
import uuid

import lz4.frame
import zstandard

NIL = uuid.UUID(int=0)
PAGE = 4096  # E2B's unit of mappings in memory and in version 5
MIB = 1 << 20

CODECS = {"none": 0, "zstd": 1, "lz4": 2}
CODEC_NAMES = {number: name for name, number in CODECS.items()}
SUFFIXES = {0: "", 1: ".zstd", 2: ".lz4"}

INNER_CAP = 256 * MIB  # uncompressed inner block of versions 4 and 5
MAX_FRAMES = 1 << 20  # frames in one build's table
MAX_TABLE_BUILDS = 0xFFFF  # builds a mapping can name (0xFFFF is E2B's "none")
MAX_V5_ENTRIES = 8 << 20
MAX_U32 = 0xFFFFFFFF
FLAG_INCOMPLETE = 0x01


class FormatError(Exception):
    pass


@dataclasses.dataclass
class BuildMap:
    offset: int
    length: int
    build: uuid.UUID
    storage: int


@dataclasses.dataclass
class BuildData:
    size: int = 0
    checksum: bytes = bytes(32)
    codec: int = 0
    # (start_u, start_c, size_u, size_c) per frame
    frames: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Header:
    version: int
    block_size: int
    size: int
    generation: int
    build_id: uuid.UUID
    base_build_id: uuid.UUID
    mappings: list
    builds: dict = None  # uuid -> BuildData; None in version 3
    incomplete: bool = False


# ---------------------------------------------------------------- varints

def put_uvarint(out, value):
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return


def put_varint(out, value):
    put_uvarint(out, (value << 1) if value >= 0 else ((-value << 1) - 1))


class Cursor:
    """Bytes read front to back; running out is a FormatError."""

    def __init__(self, data):
        self.data = data
        self.pos = 0

    def remaining(self):
        return len(self.data) - self.pos

    def take(self, count, what):
        if self.remaining() < count:
            raise FormatError(f"inner block too short for {what}")
        piece = self.data[self.pos:self.pos + count]
        self.pos += count
        return piece

    def unpack(self, fmt, what):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def uvarint(self, what):
        # As Go's binary.ReadUvarint: at most 10 bytes, the 10th at most 1.
        result = 0
        for index in range(10):
            byte = self.take(1, what)[0]
            if index == 9 and byte > 1:
                raise FormatError(f"{what}: varint overflows 64 bits")
            result |= (byte & 0x7F) << (7 * index)
            if byte < 0x80:
                return result
        raise FormatError(f"{what}: varint overflows 64 bits")

    def varint(self, what):
        raw = self.uvarint(what)
        return (raw >> 1) ^ -(raw & 1)


# ------------------------------------------------------------ LZ4 frames

def lz4_header_frame(block):
    """The inner block as E2B's Go LZ4 writer frames it: 4 MiB independent
    blocks, block and content checksums, no content size. The streaming
    calls keep the 4 MiB block size id that the one-shot call would shrink."""
    encoder = lz4.frame.LZ4FrameCompressor(
        block_size=lz4.frame.BLOCKSIZE_MAX4MB, block_linked=False,
        content_checksum=True, block_checksum=True, compression_level=0,
        auto_flush=False)
    return encoder.begin() + encoder.compress(block) + encoder.flush()


def lz4_data_frame(data):
    """One frame of a .lz4 data file: E2B uses block checksums, no content
    checksum, 4 MiB independent blocks."""
    encoder = lz4.frame.LZ4FrameCompressor(
        block_size=lz4.frame.BLOCKSIZE_MAX4MB, block_linked=False,
        content_checksum=False, block_checksum=True, compression_level=0,
        auto_flush=False)
    return encoder.begin() + encoder.compress(data) + encoder.flush()


def zstd_data_frame(data):
    """One frame of a .zstd data file: E2B writes it with a checksum."""
    return zstandard.ZstdCompressor(level=3, write_checksum=True,
                                    write_content_size=True).compress(data)


def decode_frame(codec, blob, expected):
    """The content of the single frame `blob`, which must be `expected` bytes."""
    if codec == CODECS["lz4"]:
        decoder = lz4.frame.LZ4FrameDecompressor()
        try:
            data = decoder.decompress(blob, max_length=expected + 1)
        except RuntimeError as error:
            raise FormatError(f"lz4 frame: {error}") from error
        complete = decoder.eof and not decoder.unused_data
    elif codec == CODECS["zstd"]:
        decoder = zstandard.ZstdDecompressor().decompressobj()
        try:
            data = decoder.decompress(blob)
        except zstandard.ZstdError as error:
            raise FormatError(f"zstd frame: {error}") from error
        complete = decoder.eof and not decoder.unused_data
    else:
        raise FormatError(f"codec {codec} has no frames")
    if not complete:
        raise FormatError("frame is truncated or followed by other bytes")
    if len(data) != expected:
        raise FormatError(f"frame holds {len(data)} bytes, the table says {expected}")
    return data


# ----------------------------------------------------------------- headers

METADATA = struct.Struct("<QQQQ16s16s")
RECORD = struct.Struct("<QQ16sQ")
BUILD_FIXED = struct.Struct("<16sq32s")
FRAME = struct.Struct("<qqii")


def trimmed_frames(build_id, data, mappings):
    """E2B's TrimToRanges: the frames that some mapping of this build
    overlaps; every frame when no mapping names the build."""
    ranges = [(m.storage, m.storage + m.length) for m in mappings if m.build == build_id]
    if not ranges or not data.frames:
        return list(data.frames)
    return [f for f in data.frames
            if any(f[0] < end and start < f[0] + f[2] for start, end in ranges)]


def encode_builds(header):
    out = bytearray(struct.pack("<I", len(header.builds)))
    for build_id in sorted(header.builds, key=lambda u: u.bytes):
        data = header.builds[build_id]
        out += BUILD_FIXED.pack(build_id.bytes, data.size, data.checksum)
        frames = trimmed_frames(build_id, data, header.mappings) if data.codec else []
        out += struct.pack("<II", data.codec if data.codec else 0, len(frames))
        for frame in frames:
            out += FRAME.pack(*frame)
    return out


def encode_v5_mappings(mappings):
    mapped = [m for m in mappings if m.build != NIL]
    table = []
    for m in mapped:
        if m.build not in table:
            table.append(m.build)
    position = {build: index for index, build in enumerate(table)}
    out = bytearray(struct.pack("<I", len(table)))
    for build in table:
        out += build.bytes
    out += struct.pack("<I", len(mapped))
    previous = 0
    for m in mapped:
        put_uvarint(out, m.offset // PAGE - previous)
        previous = m.offset // PAGE
    for m in mapped:
        put_uvarint(out, m.length // PAGE)
    previous = 0
    for m in mapped:
        put_varint(out, m.storage // PAGE - previous)
        previous = m.storage // PAGE
    for m in mapped:
        put_uvarint(out, position[m.build])
    return out


def encode_header(header):
    meta = METADATA.pack(header.version, header.block_size, header.size, header.generation,
                         header.build_id.bytes, header.base_build_id.bytes)
    if header.version == 3:
        return meta + b"".join(RECORD.pack(m.offset, m.length, m.build.bytes, m.storage)
                               for m in header.mappings)
    if header.version not in (4, 5):
        raise FormatError(f"unsupported header version {header.version}")
    inner = encode_builds(header)
    if header.version == 4:
        inner += struct.pack("<I", len(header.mappings))
        for m in header.mappings:
            inner += RECORD.pack(m.offset, m.length, m.build.bytes, m.storage)
    else:
        for m in header.mappings:
            for value in (m.offset, m.length, m.storage):
                if value % PAGE or value // PAGE > MAX_U32:
                    raise FormatError(f"mapping {m} is not in whole pages below 2^32")
        inner += encode_v5_mappings(header.mappings)
    if len(inner) > INNER_CAP:
        raise FormatError(f"inner block of {len(inner)} bytes exceeds the cap {INNER_CAP}")
    flags = FLAG_INCOMPLETE if header.incomplete else 0
    return meta + struct.pack("<BI", flags, len(inner)) + lz4_header_frame(bytes(inner))


def decode_frame_table(cursor, name):
    codec, count = cursor.unpack("<II", f"{name}: codec and frame count")
    if codec == 0 and count > 0:
        raise FormatError(f"{name}: codec 0 with {count} frames")
    if codec == 0 or count == 0:
        return 0, []
    if codec not in CODEC_NAMES:
        raise FormatError(f"{name}: unknown codec {codec}")
    if count > MAX_FRAMES:
        raise FormatError(f"{name}: {count} frames exceed {MAX_FRAMES}")
    frames = [FRAME.unpack(cursor.take(FRAME.size, f"{name}: frames")) for _ in range(count)]
    for index, (start_u, start_c, size_u, size_c) in enumerate(frames):
        if size_u <= 0 or size_c <= 0:
            raise FormatError(f"{name}: frame {index} has a size of zero or less")
        if index:
            before = frames[index - 1]
            if start_u < before[0] + before[2] or start_c < before[1] + before[3]:
                raise FormatError(f"{name}: frame {index} is not after frame {index - 1}")
    return codec, frames


def decode_builds(cursor):
    (count,) = cursor.unpack("<I", "build count")
    if count > cursor.remaining() // (BUILD_FIXED.size + 8):
        raise FormatError(f"build count {count} exceeds what the block holds")
    builds = {}
    for _ in range(count):
        raw_id, size, checksum = BUILD_FIXED.unpack(cursor.take(BUILD_FIXED.size, "a build"))
        build_id = uuid.UUID(bytes=raw_id)
        codec, frames = decode_frame_table(cursor, f"build {build_id}")
        builds[build_id] = BuildData(size, checksum, codec, frames)
    return builds


def decode_v5_mappings(cursor, size):
    device_pages = -(-size // PAGE)
    if device_pages > MAX_U32:
        raise FormatError("device has more than 2^32 - 1 pages")
    (table_size,) = cursor.unpack("<I", "mapping build count")
    if table_size > MAX_TABLE_BUILDS or table_size > cursor.remaining() // 16:
        raise FormatError(f"mapping build count {table_size} is too large")
    table = [uuid.UUID(bytes=cursor.take(16, "mapping build ids")) for _ in range(table_size)]
    (count,) = cursor.unpack("<I", "mapping count")
    if count > MAX_V5_ENTRIES or count > cursor.remaining() // 4 or \
            count > INNER_CAP // 42:
        raise FormatError(f"mapping count {count} is too large")
    offsets, total = [], 0
    for index in range(count):
        delta = cursor.uvarint(f"offset delta {index}")
        total += delta
        if delta > MAX_U32 or total > MAX_U32:
            raise FormatError(f"offset of entry {index} exceeds 2^32 - 1 pages")
        offsets.append(total)
    lengths = []
    for index in range(count):
        length = cursor.uvarint(f"length {index}")
        if length > MAX_U32:
            raise FormatError(f"length of entry {index} exceeds 2^32 - 1 pages")
        lengths.append(length)
    stored, total = [], 0
    for index in range(count):
        total += cursor.varint(f"storage delta {index}")
        if not 0 <= total <= MAX_U32:
            raise FormatError(f"storage offset of entry {index} out of range")
        stored.append(total)
    which = []
    for index in range(count):
        position = cursor.uvarint(f"build index {index}")
        if position >= table_size:
            raise FormatError(f"build index {position} of entry {index} out of range")
        which.append(table[position])
    mappings, current = [], 0
    for index in range(count):
        if lengths[index] == 0:
            raise FormatError(f"zero-length mapping at entry {index}")
        if offsets[index] < current:
            raise FormatError(f"entry {index} overlaps the one before")
        if offsets[index] > current:
            mappings.append(BuildMap(current * PAGE, (offsets[index] - current) * PAGE, NIL, 0))
        end = offsets[index] + lengths[index]
        if end > device_pages:
            raise FormatError(f"entry {index} ends past the device")
        mappings.append(BuildMap(offsets[index] * PAGE, lengths[index] * PAGE, which[index],
                                 stored[index] * PAGE))
        current = end
    if current < device_pages:
        mappings.append(BuildMap(current * PAGE, (device_pages - current) * PAGE, NIL, 0))
    return mappings


def decode_header(blob):
    if len(blob) < METADATA.size:
        raise FormatError(f"header too short: {len(blob)} bytes")
    version, block_size, size, generation, raw_build, raw_base = METADATA.unpack_from(blob)
    build_id, base_build_id = uuid.UUID(bytes=raw_build), uuid.UUID(bytes=raw_base)
    rest = blob[METADATA.size:]
    if block_size == 0:
        raise FormatError("block size cannot be zero")
    builds, incomplete = None, False
    if version in (1, 2, 3):
        if len(rest) % RECORD.size:
            raise FormatError("mapping records do not fill the header")
        mappings = [BuildMap(o, l, uuid.UUID(bytes=b), s)
                    for o, l, b, s in RECORD.iter_unpack(rest)]
    elif version in (4, 5):
        if len(rest) < 5:
            raise FormatError("too short for flags and the inner block's length")
        flags, length = struct.unpack_from("<BI", rest)
        incomplete = bool(flags & FLAG_INCOMPLETE)
        if length > INNER_CAP:
            raise FormatError(f"inner block size {length} exceeds the cap")
        decoder = lz4.frame.LZ4FrameDecompressor()
        try:
            inner = decoder.decompress(rest[5:], max_length=length + 1)
        except RuntimeError as error:
            raise FormatError(f"inner block: {error}") from error
        if len(inner) != length:
            raise FormatError(f"inner block holds {len(inner)} bytes, its prefix says {length}")
        # Go reads one byte past the length, so through the frame's end mark
        # and content checksum: a frame cut short there is an error too.
        if not decoder.eof:
            raise FormatError("inner block's LZ4 frame is cut short")
        cursor = Cursor(inner)
        builds = decode_builds(cursor)
        if version == 4:
            (count,) = cursor.unpack("<I", "mapping count")
            if count > cursor.remaining() // RECORD.size:
                raise FormatError(f"mapping count {count} exceeds the bytes left")
            mappings = [BuildMap(o, l, uuid.UUID(bytes=b), s) for o, l, b, s in
                        (RECORD.unpack(cursor.take(RECORD.size, "a mapping"))
                         for _ in range(count))]
        else:
            mappings = decode_v5_mappings(cursor, size)
    else:
        raise FormatError(f"unsupported header version {version}")
    # E2B's NewHeader: versions 3 and 4 without mappings map the whole device
    # to the header's own build.
    if version != 5 and not mappings:
        mappings = [BuildMap(0, -(-size // PAGE) * PAGE, build_id, 0)]
    for m in mappings:
        for value in (m.offset, m.length, m.storage):
            if value % PAGE or value // PAGE > MAX_U32:
                raise FormatError(f"mapping {m} is not in whole pages below 2^32")
    distinct = {m.build for m in mappings if m.build != NIL}
    if len(distinct) > MAX_TABLE_BUILDS:
        raise FormatError(f"mappings name {len(distinct)} builds")
    return Header(version, block_size, size, generation, build_id, base_build_id, mappings,
                  builds, incomplete)


# -------------------------------------------------------------- JSON form

def to_json(header):
    doc = {
        "version": header.version, "block_size": header.block_size, "size": header.size,
        "generation": header.generation, "build_id": str(header.build_id),
        "base_build_id": str(header.base_build_id), "incomplete": header.incomplete,
        "mappings": [{"offset": m.offset, "length": m.length, "build_id": str(m.build),
                      "build_storage_offset": m.storage} for m in header.mappings],
        "builds": None,
    }
    if header.builds is not None:
        doc["builds"] = [
            {"build_id": str(build_id), "size": data.size, "sha256": data.checksum.hex(),
             "codec": CODEC_NAMES[data.codec], "frames": [list(f) for f in data.frames]}
            for build_id, data in sorted(header.builds.items(), key=lambda item: item[0].bytes)]
    return doc


def from_json(doc):
    builds = None
    if doc.get("builds") is not None:
        builds = {uuid.UUID(b["build_id"]): BuildData(
            b["size"], bytes.fromhex(b["sha256"]), CODECS[b["codec"]],
            [tuple(f) for f in b["frames"]]) for b in doc["builds"]}
    return Header(doc["version"], doc["block_size"], doc["size"], doc["generation"],
                  uuid.UUID(doc["build_id"]), uuid.UUID(doc["base_build_id"]),
                  [BuildMap(m["offset"], m["length"], uuid.UUID(m["build_id"]),
                            m["build_storage_offset"]) for m in doc["mappings"]],
                  builds, doc.get("incomplete", False))


# ------------------------------------------------------------------ store

def header_path(store, build, name):
    return os.path.join(store, str(build), name + ".header")


def data_path(store, build, name, codec):
    return os.path.join(store, str(build), name + SUFFIXES[codec])


def load_header(store, build, name):
    with open(header_path(store, build, name), "rb") as f:
        return decode_header(f.read())


def authoritative_data(store, build, name, header):
    """How `build`'s data file is stored, as E2B's read path decides: this
    header's entry; for its own build without one, uncompressed; for an
    ancestor without one, that build's own header's entry for itself."""
    if header.version < 4:
        return BuildData()
    if build in header.builds:
        return header.builds[build]
    if build == header.build_id:
        return BuildData()
    own = load_header(store, build, name)
    if own.builds and build in own.builds:
        return own.builds[build]
    return BuildData()


class DataFiles:
    """Each build's uncompressed data file, decoded once from its own
    header's full table and checked against its size and SHA-256."""

    def __init__(self, store, name):
        self.store, self.name, self.files, self.objects = store, name, {}, {}
        self.frames = {}  # (build, start_c) -> that frame's content, decoded once

    def frame(self, build, codec, stored, frame):
        start_u, start_c, size_u, size_c = frame
        key = (build, start_c)
        if key not in self.frames:
            self.frames[key] = decode_frame(codec, stored[start_c:start_c + size_c], size_u)
        return self.frames[key]

    def stored(self, build, codec):
        path = data_path(self.store, build, self.name, codec)
        if path not in self.objects:
            with open(path, "rb") as f:
                self.objects[path] = f.read()
        return self.objects[path]

    def whole(self, build):
        if build in self.files:
            return self.files[build]
        own = load_header(self.store, build, self.name)
        if own.incomplete:
            raise FormatError(f"header of {build} is of an unfinished upload")
        data = own.builds.get(build) if own.builds else None
        codec = data.codec if data else 0
        stored = self.stored(build, codec)
        if codec == 0:
            content = stored
        else:
            pieces, at_u, at_c = [], 0, 0
            for start_u, start_c, size_u, size_c in data.frames:
                if start_u != at_u or start_c != at_c:
                    raise FormatError(f"{build}'s own frame table has a gap at {at_u}")
                pieces.append(self.frame(build, codec, stored, (start_u, start_c, size_u, size_c)))
                at_u, at_c = start_u + size_u, start_c + size_c
            if at_c != len(stored):
                raise FormatError(f"{build}'s data file has {len(stored) - at_c} bytes past its frames")
            content = b"".join(pieces)
        if data and data.size and len(content) != data.size:
            raise FormatError(f"{build}'s data file holds {len(content)} bytes, its header says {data.size}")
        if data and data.checksum != bytes(32) and hashlib.sha256(content).digest() != data.checksum:
            raise FormatError(f"{build}'s data file does not match its SHA-256")
        self.files[build] = content
        return content

    def read(self, header, build, offset, length):
        """[offset, offset + length) of `build`'s data file, through the table
        `header` holds for it (trimmed: only the frames its mappings reach)."""
        data = authoritative_data(self.store, build, self.name, header)
        if data.codec == 0:
            piece = self.whole(build)[offset:offset + length]
        else:
            stored = self.stored(build, data.codec)
            parts, position = [], offset
            while position < offset + length:
                frame = next((f for f in data.frames if f[0] <= position < f[0] + f[2]), None)
                if frame is None:
                    raise FormatError(f"{build}: offset {position} is in no frame of the table")
                start_u, size_u = frame[0], frame[2]
                content = self.frame(build, data.codec, stored, frame)
                parts.append(content[position - start_u:min(offset + length, start_u + size_u) - start_u])
                position = start_u + size_u
            piece = b"".join(parts)
            if piece != self.whole(build)[offset:offset + length]:
                raise FormatError(f"{build}: frames read through the header differ from the file")
        if len(piece) != length:
            raise FormatError(f"{build}'s data file ends before {offset + length}")
        return piece


def read_device(store, build, name):
    header = load_header(store, build, name)
    if header.incomplete:
        raise FormatError(f"header of {build} is of an unfinished upload")
    files = DataFiles(store, name)
    out = bytearray()
    for m in header.mappings:
        if m.build == NIL:
            out += bytes(m.length)
        else:
            out += files.read(header, m.build, m.storage, m.length)
    if len(out) < header.size:
        raise FormatError(f"mappings cover {len(out)} bytes of a {header.size}-byte device")
    return bytes(out[:header.size])


# ----------------------------------------------------------------- writing

def create_mapping(build, blocks, block_size):
    """E2B's CreateMapping: one mapping per run of consecutive blocks, the
    runs packed one after another in storage."""
    result, stored = [], 0
    for index in blocks:
        last = result[-1] if result else None
        if last and last.offset + last.length == index * block_size:
            last.length += block_size
        else:
            result.append(BuildMap(index * block_size, block_size, build, stored))
        stored += block_size
    return result


def overlay(base, changes):
    """E2B's MergeMappings: `changes` (sorted, disjoint) laid over `base`,
    which tiles the device; what is left of a base mapping keeps its storage
    offset, moved by how far into the mapping the piece starts."""
    result = []
    for piece in base:
        pieces = [(piece.offset, piece.offset + piece.length)]
        for c in changes:
            cut = []
            for start, end in pieces:
                if c.offset + c.length <= start or end <= c.offset:
                    cut.append((start, end))
                    continue
                if start < c.offset:
                    cut.append((start, c.offset))
                if c.offset + c.length < end:
                    cut.append((c.offset + c.length, end))
            pieces = cut
        result += [BuildMap(start, end - start, piece.build, piece.storage + start - piece.offset)
                   for start, end in pieces]
    return sorted(result + [dataclasses.replace(c) for c in changes], key=lambda m: m.offset)


def normalize(mappings):
    """E2B's NormalizeMappings: neighbours of one build join where their
    storage is contiguous; zero ranges always join (the first one's storage
    offset stays)."""
    result = []
    for m in mappings:
        last = result[-1] if result else None
        if last and last.build == m.build and \
                (m.build == NIL or m.storage == last.storage + last.length):
            last.length += m.length
        else:
            result.append(dataclasses.replace(m))
    return result


def compress_frames(data, codec, frame_size):
    """The data file cut into frames of frame_size (the last shorter), each
    compressed on its own; the stored bytes and E2B's full frame table."""
    encode = zstd_data_frame if codec == CODECS["zstd"] else lz4_data_frame
    stored, frames, at_c = bytearray(), [], 0
    for at_u in range(0, len(data), frame_size):
        piece = encode(data[at_u:at_u + frame_size])
        frames.append((at_u, at_c, min(frame_size, len(data) - at_u), len(piece)))
        stored += piece
        at_c += len(piece)
    return bytes(stored), frames


def write_build(store, build, name, image, block_size, codec, version, frame_size=2 * MIB,
                parent=None):
    if codec and version == 3:
        raise FormatError("a version 3 header cannot describe a compressed build")
    if len(image) % block_size and block_size != PAGE:
        raise FormatError(f"an image of {len(image)} bytes is not in whole blocks of {block_size}")
    if frame_size <= 0 or frame_size % block_size:
        raise FormatError(f"frame size {frame_size} is not a multiple of the block size")
    blocks = -(-len(image) // block_size)
    previous, parent_header = None, None
    if parent is not None:
        parent_header = load_header(store, parent, name)
        if parent_header.size != len(image) or parent_header.block_size != block_size:
            raise FormatError("the image and its parent differ in size or block size")
        previous = read_device(store, parent, name)
    dirty, empty, diff = [], [], bytearray()
    for index in range(blocks):
        block = image[index * block_size:(index + 1) * block_size].ljust(block_size, b"\0")
        if previous is not None and \
                block == previous[index * block_size:(index + 1) * block_size].ljust(block_size, b"\0"):
            continue
        if block.count(0) == block_size:
            empty.append(index)
        else:
            dirty.append(index)
            diff += block
    changes = sorted(create_mapping(build, dirty, block_size) + create_mapping(NIL, empty, block_size),
                     key=lambda m: m.offset)
    base = parent_header.mappings if parent_header else [BuildMap(0, blocks * block_size, NIL, 0)]
    mappings = normalize(overlay(base, changes))
    if parent_header:
        generation, base_id = parent_header.generation + 1, parent_header.base_build_id
    else:
        generation, base_id = 0, build
    header = Header(version, block_size, len(image), generation, build, base_id, mappings)

    diff = bytes(diff)
    os.makedirs(os.path.join(store, str(build)), exist_ok=True)
    if codec:
        stored, frames = compress_frames(diff, codec, frame_size)
        self_entry = BuildData(len(diff), hashlib.sha256(diff).digest(), codec, frames)
        with open(data_path(store, build, name, codec) + ".uncompressed-size", "w") as f:
            f.write(str(len(diff)))
    else:
        stored = diff
        self_entry = BuildData(len(diff), hashlib.sha256(diff).digest(), 0, [])
    with open(data_path(store, build, name, codec), "wb") as f:
        f.write(stored)

    named = [b for b in dict.fromkeys(m.build for m in mappings) if b != NIL]
    if version == 3:
        for ancestor in named:
            if ancestor == build:
                continue
            own = load_header(store, ancestor, name)
            if own.builds and own.builds.get(ancestor, BuildData()).codec:
                raise FormatError(f"a version 3 header cannot map into compressed build {ancestor}")
    else:
        # What E2B's upload does: the parent's entries for builds still
        # named, each ancestor's own entry for itself (an empty one for a
        # version 3 ancestor), then the new build's own.
        header.builds = {}
        if parent_header and parent_header.builds:
            header.builds = {b: parent_header.builds[b] for b in named if b in parent_header.builds}
        for ancestor in named:
            if ancestor == build:
                continue
            own = load_header(store, ancestor, name)
            if own.builds and ancestor in own.builds:
                header.builds[ancestor] = own.builds[ancestor]
            elif own.version < 4:
                header.builds[ancestor] = BuildData()
        header.builds[build] = self_entry
    with open(header_path(store, build, name), "wb") as f:
        f.write(encode_header(header))
    return header


# ---------------------------------------------------------------------- CLI

def parse_size(text):
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(text[:-len(unit)]) * factor
    return int(text)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write a build into a store")
    write.add_argument("--store", required=True)
    write.add_argument("--build", required=True, type=uuid.UUID)
    write.add_argument("--parent", type=uuid.UUID)
    write.add_argument("--name", required=True)
    write.add_argument("--block-size", required=True, type=parse_size)
    write.add_argument("--codec", choices=sorted(CODECS), default="none")
    write.add_argument("--version", type=int, choices=(3, 4, 5), default=4)
    write.add_argument("--frame-size", type=parse_size, default=2 * MIB)
    write.add_argument("image")
    read = commands.add_parser("read", help="read a build's device back")
    read.add_argument("--store", required=True)
    read.add_argument("--build", required=True, type=uuid.UUID)
    read.add_argument("--name", required=True)
    read.add_argument("-o", "--output", required=True)
    dump = commands.add_parser("dump", help="headers as JSON")
    dump.add_argument("headers", nargs="+")
    encode = commands.add_parser("encode", help="headers from JSON")
    encode.add_argument("pairs", nargs="+", metavar="JSON HEADER")
    args = parser.parse_args(argv)
    try:
        if args.command == "write":
            with open(args.image, "rb") as f:
                image = f.read()
            write_build(args.store, args.build, args.name, image, args.block_size,
                        CODECS[args.codec], args.version, args.frame_size, args.parent)
        elif args.command == "read":
            device = read_device(args.store, args.build, args.name)
            with open(args.output, "wb") as f:
                f.write(device)
        elif args.command == "dump":
            docs = []
            for path in args.headers:
                with open(path, "rb") as f:
                    docs.append(to_json(decode_header(f.read())))
            json.dump(docs[0] if len(docs) == 1 else docs, sys.stdout, indent=1)
            sys.stdout.write("\n")
        else:
            if len(args.pairs) % 2:
                parser.error("encode takes pairs of JSON file and header file")
            for source, target in zip(args.pairs[::2], args.pairs[1::2]):
                with open(source) as f:
                    blob = encode_header(from_json(json.load(f)))
                with open(target, "wb") as f:
                    f.write(blob)
    except (FormatError, OSError) as error:
        print(f"e2b.py {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
