#!/usr/bin/env python3
"""Records when each agent's messages reach a manager's namespace, from the wire.

Listens on an interface with an AF_PACKET socket (run it inside the manager's namespace),
finds the clear-text `!ID!` prefix of Wazuh messages in TCP segments to PORT (and, given ADDR,
to that IPv4 address only: a bridge floods frames for a port whose link is down to every other
port) and prints `<ms> <agent id>` lines, one per agent per 10 ms at most, until DURATION
seconds have passed. Retransmissions count as arrivals. The interface going down and up again
(the blackhole scenario) does not end it. Usage: gapwatch.py IFACE PORT DURATION [ADDR]
"""
import re
import socket
import struct
import sys
import time

iface, port, duration = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
dst = socket.inet_aton(sys.argv[4]) if len(sys.argv) > 4 else None
ETH_P_IP = 0x0800
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
s.bind((iface, 0))
s.settimeout(0.5)
ident = re.compile(rb"!([0-9]{3,8})!")
last = {}
end = time.monotonic() + duration
out = sys.stdout
while time.monotonic() < end:
    try:
        pkt = s.recv(65535)
    except socket.timeout:
        continue
    except OSError:
        # ENETDOWN while the link is down: wait for it to come back.
        time.sleep(0.05)
        continue
    ip = pkt[14:]
    if len(ip) < 20 or ip[9] != 6 or (dst is not None and ip[16:20] != dst):
        continue
    ihl = (ip[0] & 15) * 4
    tcp = ip[ihl:]
    if len(tcp) < 20 or struct.unpack("!H", tcp[2:4])[0] != port:
        continue
    payload = tcp[(tcp[12] >> 4) * 4:]
    if not payload:
        continue
    ms = time.time_ns() // 1_000_000
    for m in set(ident.findall(payload)):
        if ms - last.get(m, 0) >= 10:
            last[m] = ms
            out.write(f"{ms} {m.decode()}\n")
    out.flush()
