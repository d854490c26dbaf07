"""A small DNS responder for one tenant network (what Docker's 127.0.0.11 does).

It answers A queries for the names of containers on its own network (container name,
``--network-alias`` aliases, hostname, short id); names are matched case-insensitively
and a trailing dot is ignored. Single-label names that aren't known get NXDOMAIN
straight away (they can't be public names, and this is what keeps another tenant's
container names unresolvable: each responder only knows its own network). Other names
are relayed as-is to the node's upstream resolvers.

Only the parts of RFC 1035 needed for that are implemented: the header, one question,
A/AAAA/ANY answers, and relaying raw packets.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from pathlib import Path

QTYPE_A = 1
QTYPE_AAAA = 28
QTYPE_ANY = 255
QCLASS_IN = 1
RCODE_OK = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
TTL = 5


class DNSFormatError(ValueError):
    """The packet isn't a DNS query we can parse."""


@dataclass(frozen=True)
class Question:
    id: int
    flags: int
    name: str  # lower-case, no trailing dot
    qtype: int
    qclass: int
    raw_question: bytes  # the question section as received, echoed back in answers


def parse_query(packet: bytes) -> Question:
    if len(packet) < 12:
        raise DNSFormatError("short packet")
    ident, flags, qdcount = struct.unpack("!HHH", packet[:6])
    if flags & 0x8000:
        raise DNSFormatError("not a query")
    if qdcount != 1:
        raise DNSFormatError("exactly one question expected")
    labels: list[str] = []
    pos = 12
    while True:
        if pos >= len(packet):
            raise DNSFormatError("truncated name")
        length = packet[pos]
        pos += 1
        if length == 0:
            break
        if length & 0xC0:
            raise DNSFormatError("compressed names are not valid in a question")
        label = packet[pos : pos + length]
        if len(label) != length:
            raise DNSFormatError("truncated label")
        labels.append(label.decode("ascii", "replace"))
        pos += length
    if pos + 4 > len(packet):
        raise DNSFormatError("truncated question")
    qtype, qclass = struct.unpack("!HH", packet[pos : pos + 4])
    return Question(
        id=ident,
        flags=flags,
        name=".".join(labels).lower(),
        qtype=qtype,
        qclass=qclass,
        raw_question=packet[12 : pos + 4],
    )


def build_response(q: Question, rcode: int, addresses: list[str]) -> bytes:
    """A response echoing the question, with A records for ``addresses``."""
    # QR, opcode copied, AA, RD copied, RA
    flags = 0x8000 | (q.flags & 0x7800) | 0x0400 | (q.flags & 0x0100) | 0x0080 | rcode
    answers = b""
    for address in addresses:
        # name: pointer to the question name at offset 12
        answers += struct.pack("!HHHIH", 0xC00C, QTYPE_A, QCLASS_IN, TTL, 4)
        answers += ipaddress.IPv4Address(address).packed
    header = struct.pack("!HHHHHH", q.id, flags, 1, len(addresses), 0, 0)
    return header + q.raw_question + answers


def error_response(packet: bytes, rcode: int) -> bytes | None:
    """FORMERR/SERVFAIL for a packet we could only partly read (None if not even that)."""
    if len(packet) < 12:
        return None
    ident, flags = struct.unpack("!HH", packet[:4])
    flags = 0x8000 | (flags & 0x0100) | 0x0080 | rcode
    return struct.pack("!HHHHHH", ident, flags, 0, 0, 0, 0)


class Records:
    """The names one network's responder knows: name -> addresses."""

    def __init__(self, names: dict[str, list[str]] | None = None) -> None:
        self.names: dict[str, list[str]] = {}
        for name, addresses in (names or {}).items():
            for address in addresses:
                self.add(name, address)

    def add(self, name: str, address: str) -> None:
        key = name.lower().rstrip(".")
        if not key:
            return
        bucket = self.names.setdefault(key, [])
        if address not in bucket:
            bucket.append(address)

    def answer(self, packet: bytes) -> bytes | None:
        """The reply to ``packet``, or None when it must be relayed upstream."""
        try:
            q = parse_query(packet)
        except DNSFormatError:
            return error_response(packet, RCODE_FORMERR)
        addresses = self.names.get(q.name)
        if addresses is not None:
            if q.qclass != QCLASS_IN:
                return build_response(q, RCODE_OK, [])
            wanted = addresses if q.qtype in (QTYPE_A, QTYPE_ANY) else []
            return build_response(q, RCODE_OK, sorted(wanted))
        if "." not in q.name:
            return build_response(q, RCODE_NXDOMAIN, [])
        return None


def host_upstreams(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    """The node's IPv4 nameservers, as the daemon (on the host) can reach them."""
    servers = []
    try:
        text = resolv_conf.read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                ipaddress.IPv4Address(parts[1])
            except ValueError:
                continue
            servers.append(parts[1])
    return servers
