#!/usr/bin/env python3
"""Seeds fuzz/corpus/<target>/ from the shared Wazuh protocol vectors.

Usage: python3 fuzz/seed_corpus.py [VECTORS_DIR]
VECTORS_DIR defaults to ../shared/vectors next to the repository (where CI puts it).

frame_decoder seeds are recorded TCP streams (whole sessions and single frames) behind the
target's control prefix, once as one chunk and once cut into 1-, 8- and 4608-byte chunks, plus
the sessions again under a 300-byte payload limit. envelope seeds are frame payloads (the TCP
length header removed) and UDP datagrams. Files are named by their SHA-1, as libFuzzer names
its own, so running this twice adds nothing. Standard library only.
"""

import base64
import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_VECTORS = os.path.join(HERE, "..", "..", "shared", "vectors")

# Control bytes of the frame_decoder input layout (see fuzz_targets/frame_decoder.rs).
ONE_CHUNK = bytes([0x00])
SPLIT = bytes([0x03, 0x00, 0x07, 0x88])  # chunks of 1, 8 and 9 * 512 bytes, cycled
SMALL_LIMIT = bytes([0x60])  # LIMITS[6] = 300 bytes, one chunk


def rows(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def write(target, data, counts):
    folder = os.path.join(HERE, "corpus", target)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, hashlib.sha1(data).hexdigest())
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(data)
        counts[target] = counts.get(target, 0) + 1


def main():
    vectors = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_VECTORS)
    if not os.path.isdir(vectors):
        print(f"seed_corpus: NO VECTORS at {vectors}: corpus not seeded", file=sys.stderr)
        return 0
    counts = {}
    streams = []  # TCP byte streams, length headers included
    payloads = []  # single frame payloads or datagrams

    for r in rows(os.path.join(vectors, "sessions.jsonl")):
        stream = base64.b64decode(r["stream_b64"])
        streams.append(stream)
        write("frame_decoder", SMALL_LIMIT + stream, counts)
    for name in ("agent_to_manager.jsonl", "manager_to_agent.jsonl", "ping_pong.jsonl"):
        path = os.path.join(vectors, name)
        if not os.path.exists(path):
            continue
        for r in rows(path):
            wire = base64.b64decode(r["wire_b64"])
            # ping_pong has one TCP #pong recorded without its length header: try both readings.
            framed = r.get("transport") == "tcp" and len(wire) >= 4 and (
                int.from_bytes(wire[:4], "little") == len(wire) - 4
            )
            if framed:
                streams.append(wire)
                payloads.append(wire[4:])
            else:
                payloads.append(wire)

    for s in streams:
        write("frame_decoder", ONE_CHUNK + s, counts)
        write("frame_decoder", SPLIT + s, counts)
    for p in payloads:
        write("envelope", p, counts)

    for target in ("frame_decoder", "envelope"):
        print(f"seed_corpus: {counts.get(target, 0)} new seeds in fuzz/corpus/{target}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
