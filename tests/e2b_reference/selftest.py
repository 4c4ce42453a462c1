#!/usr/bin/python3
"""The reference's own check: chains of builds written and read back in
every header version, codec and block size, headers that decode and encode
to the same bytes, and damage that is caught. Exit 0 when all pass, 1 on a
failure, 77 (skipped) without python3-lz4 and python3-zstandard."""

import os
import random
import sys
import tempfile
import uuid

try:
    import lz4.frame  # noqa: F401
    import zstandard  # noqa: F401
except ImportError as missing:
    print(f"skipped: {missing} (install python3-lz4 and python3-zstandard)")
    sys.exit(77)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2b  # noqa: E402

failures = []


def check(condition, what):
    if not condition:
        failures.append(what)
        print(f"FAIL: {what}")


def raises(call, what):
    try:
        call()
    except e2b.FormatError:
        return
    check(False, f"{what}: no error")


def image_with(rng, blocks, block_size, previous=None, changed=0.3):
    """Blocks of random bytes, zeros and (from `previous`) unchanged ones."""
    out = bytearray()
    for index in range(blocks):
        roll = rng.random()
        if previous is not None and roll > changed:
            out += previous[index * block_size:(index + 1) * block_size]
        elif roll < 0.1:
            out += bytes(block_size)
        else:
            # Compressible, yet different in every block.
            out += bytes([rng.randrange(4)]) * (block_size // 2) + rng.randbytes(block_size // 2)
    return bytes(out)


def chain(store, rng, version, codec, block_size, frame_size, blocks):
    name = "rootfs.ext4" if block_size == 4096 else "memfile"
    builds, images, parent = [], [], None
    for generation in range(3):
        image = image_with(rng, blocks, block_size, images[-1] if images else None)
        build = uuid.UUID(bytes=rng.randbytes(16))
        header = e2b.write_build(store, build, name, image, block_size, codec, version,
                                 frame_size, parent)
        what = f"v{version} {e2b.CODEC_NAMES[codec]} {block_size} generation {generation}"
        check(header.generation == generation, f"{what}: generation")
        check(e2b.read_device(store, build, name) == image, f"{what}: reads back")
        with open(e2b.header_path(store, build, name), "rb") as f:
            blob = f.read()
        decoded = e2b.decode_header(blob)
        empty_diff = version >= 4 and codec and decoded.builds[build].size == 0
        # E2B reads a compressed build of no frames (an empty diff) as
        # uncompressed, and so writes it back.
        check((e2b.encode_header(decoded) == blob) != bool(empty_diff),
              f"{what}: decode then encode is the same bytes")
        check(e2b.from_json(e2b.to_json(decoded)) == decoded, f"{what}: JSON round trip")
        if version >= 4:
            # E2B's frame descriptor: version 1, independent blocks, block
            # and content checksums, 4 MiB blocks.
            check(blob[69:75] == bytes([0x04, 0x22, 0x4d, 0x18, 0x74, 0x70]),
                  f"{what}: LZ4 frame descriptor {blob[69:75].hex()}")
            own = decoded.builds[build]
            check(own.codec == (0 if empty_diff else codec), f"{what}: own codec")
            if codec:
                check(os.path.exists(e2b.data_path(store, build, name, codec)),
                      f"{what}: data file named by codec")
                check(all(f[2] <= frame_size for f in own.frames), f"{what}: frame sizes")
        builds.append(build)
        images.append(image)
        parent = build
    return name, builds, images


def main():
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as store:
        for version, codec in [(3, 0), (4, 0), (4, 1), (4, 2), (5, 0), (5, 1), (5, 2)]:
            chain(store, rng, version, codec, 4096, 16 * 4096, 96)
        chain(store, rng, 5, 1, 2 << 20, 2 << 20, 5)
        chain(store, rng, 4, 2, 2 << 20, 4 << 20, 5)

        # A mixed chain: v3 base, compressed v4 child, v5 grandchild.
        name = "rootfs.ext4"
        a, b, c = (uuid.UUID(bytes=rng.randbytes(16)) for _ in range(3))
        first = image_with(rng, 64, 4096)
        e2b.write_build(store, a, name, first, 4096, 0, 3)
        second = image_with(rng, 64, 4096, first)
        e2b.write_build(store, b, name, second, 4096, 1, 4, 8 * 4096, a)
        third = image_with(rng, 64, 4096, second)
        header = e2b.write_build(store, c, name, third, 4096, 2, 5, 8 * 4096, b)
        check(e2b.read_device(store, c, name) == third, "mixed chain reads back")
        check(header.builds[a] == e2b.BuildData(), "a v3 ancestor gets an empty entry")
        check(header.builds[b].codec == 1, "the zstd parent keeps its entry")
        referenced = {m.storage // (8 * 4096) for m in header.mappings if m.build == b}
        with open(e2b.header_path(store, c, name), "rb") as f:
            stored_b = e2b.decode_header(f.read()).builds[b]
        check({f[0] // (8 * 4096) for f in stored_b.frames} <= referenced | {
            (m.storage + m.length - 1) // (8 * 4096) for m in header.mappings if m.build == b},
            "the parent's frame table is trimmed to what the mappings reach")
        raises(lambda: e2b.write_build(store, uuid.uuid4(), name, third, 4096, 0, 3, parent=c),
               "a v3 header over compressed ancestors")

        # Damage is caught: a flipped byte in a compressed frame, a wrong
        # checksum, a truncated header, the unfinished-upload flag.
        path = e2b.data_path(store, b, name, 1)
        with open(path, "rb") as f:
            good = f.read()
        with open(path, "wb") as f:
            f.write(good[:40] + bytes([good[40] ^ 0x10]) + good[41:])
        raises(lambda: e2b.read_device(store, c, name), "a damaged zstd frame")
        with open(path, "wb") as f:
            f.write(good)
        with open(e2b.header_path(store, c, name), "rb") as f:
            blob = f.read()
        for cut in (0, 63, 64, 68, 75, len(blob) - 1):
            raises(lambda: e2b.decode_header(blob[:cut]), f"a header cut at {cut}")
        flagged = e2b.decode_header(blob)
        flagged.incomplete = True
        with open(e2b.header_path(store, c, name), "wb") as f:
            f.write(e2b.encode_header(flagged))
        raises(lambda: e2b.read_device(store, c, name), "an unfinished upload")
        with open(e2b.header_path(store, c, name), "wb") as f:
            f.write(blob)

        # Version 5 stores a fragmented mapping in far fewer bytes.
        fragmented = e2b.decode_header(blob)
        v4 = e2b.encode_header(e2b.Header(**{**vars(fragmented), "version": 4}))
        check(len(blob) < len(v4), f"v5 ({len(blob)} bytes) is smaller than v4 ({len(v4)})")

    print(f"{'FAILED' if failures else 'ok'}: {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
