#!/usr/bin/env python3
"""Seeds fuzz/corpus/<target>/ from the shared Wazuh protocol vectors.

Usage: python3 fuzz/seed_corpus.py [VECTORS_DIR]
VECTORS_DIR defaults to ../shared/vectors next to the repository (where CI puts it).

frame_decoder seeds are recorded TCP streams (whole sessions and single frames) behind the
target's control prefix, once as one chunk and once cut into 1-, 8- and 4608-byte chunks, plus
the sessions again under a 300-byte payload limit. envelope seeds are frame payloads (the TCP
length header removed) and UDP datagrams.

decrypt seeds (layout in fuzz_targets/decrypt.rs) are the ciphertexts of the agent whose key
the target holds (001 web-01), the recorded inner messages re-compressed under the cipher layer,
the plaintexts as round-trip messages, and a few decompression bombs. control seeds are the
recorded plaintexts in both directions; enroll_request seeds are the recorded enrollment request
lines. config_toml and nginx_config seeds come from the repository (deploy/proxy.toml,
proxy-bin/tests/fixtures/nginx/**), and are written even without the vectors.

Files are named by their SHA-1, as libFuzzer names its own, so running this twice adds nothing.
Standard library only.
"""

import base64
import hashlib
import json
import os
import sys
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_VECTORS = os.path.join(HERE, "..", "..", "shared", "vectors")
REPO = os.path.join(HERE, "..")

# The key the decrypt target holds (fuzz_targets/decrypt.rs), also the key of agent 001 in the
# vectors: its recorded ciphertexts open in the target.
DECRYPT_KEY_LINE = "001 web-01 any 61f01f714746b01b977d7c65a724409f33ad89c391ad93f918eb27202dca8223"
# Control bytes of the decrypt layout: bit 0 the cipher, bits 1-2 the mode.
CIPHER_BIT = {"aes": 0, "blowfish": 1}
RAW, PLAIN, BOMB, ROUND_TRIP = 0, 2, 4, 6

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
    counts = {}
    seed_configs(counts)
    if not os.path.isdir(vectors):
        print(f"seed_corpus: NO VECTORS at {vectors}: protocol corpora not seeded", file=sys.stderr)
        report(counts)
        return 0
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

    seed_messages(vectors, counts)
    seed_enrollment(vectors, counts)
    report(counts)
    return 0


TARGETS = ("frame_decoder", "envelope", "decrypt", "control", "enroll_request", "config_toml",
           "nginx_config")


def report(counts):
    for target in TARGETS:
        print(f"seed_corpus: {counts.get(target, 0)} new seeds in fuzz/corpus/{target}/")


def sealed_plain(inner):
    """'!' padding + zlib(inner): what lies under the cipher layer."""
    z = zlib.compress(inner, 9)
    return b"!" * (8 - len(z) % 8) + z


def seed_messages(vectors, counts):
    for name in ("agent_to_manager.jsonl", "manager_to_agent.jsonl"):
        path = os.path.join(vectors, name)
        if not os.path.exists(path):
            continue
        for r in rows(path):
            cipher = CIPHER_BIT.get(r.get("cipher"), 0)
            plain = base64.b64decode(r["plaintext_b64"]) if "plaintext_b64" in r else b""
            write("control", plain, counts)
            write("decrypt", bytes([ROUND_TRIP | cipher, 0x31, 0xd4, 0x07]) + plain, counts)
            if r.get("inner_b64"):
                inner = base64.b64decode(r["inner_b64"])
                write("decrypt", bytes([PLAIN | cipher]) + sealed_plain(inner), counts)
            if r.get("client_keys") == DECRYPT_KEY_LINE:
                wire = base64.b64decode(r["wire_b64"])
                if r.get("transport") == "tcp" and len(wire) > 4:
                    wire = wire[4:]
                # The ciphertext follows the '!ID!' prefix and the cipher tag.
                for tag in (b"#AES:", b":"):
                    at = wire.find(tag)
                    if at >= 0:
                        write("decrypt", bytes([RAW | cipher]) + wire[at + len(tag):], counts)
                        break
    # Decompression bombs: a short pattern repeated to 1 MiB, and one just over the limit.
    for cipher in (0, 1):
        write("decrypt", bytes([BOMB | cipher, 0xff, 0xff]) + b"A", counts)
        write("decrypt", bytes([BOMB | cipher, 0x01, 0x10]) + b"1234567890123456", counts)


def seed_enrollment(vectors, counts):
    path = os.path.join(vectors, "enrollment.jsonl")
    if not os.path.exists(path):
        return
    for r in rows(path):
        if r.get("request_b64"):
            write("enroll_request", base64.b64decode(r["request_b64"]), counts)


def seed_configs(counts):
    toml = os.path.join(REPO, "deploy", "proxy.toml")
    if os.path.exists(toml):
        with open(toml, "rb") as f:
            write("config_toml", f.read(), counts)
    nginx = os.path.join(REPO, "proxy-bin", "tests", "fixtures", "nginx")
    for folder, _, files in os.walk(nginx):
        for name in sorted(files):
            with open(os.path.join(folder, name), "rb") as f:
                write("nginx_config", f.read(), counts)


if __name__ == "__main__":
    sys.exit(main())
