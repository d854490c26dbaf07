"""Pure parts of the network subsystem: DNS codec, nft rendering, names, validation."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from runtime_agent.errors import InvalidArgument
from runtime_agent.network import firewall
from runtime_agent.network.dns import (
    QTYPE_A,
    QTYPE_AAAA,
    RCODE_FORMERR,
    RCODE_NXDOMAIN,
    RCODE_OK,
    Records,
    host_upstreams,
)
from runtime_agent.network.manager import _check_port, _parse_subnet, kernel_prefix
from runtime_agent.protocol import PortMapping


def query(name: str, qtype: int = QTYPE_A, ident: int = 0x1234) -> bytes:
    body = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + body + struct.pack("!HH", qtype, 1)


def parse_answer(packet: bytes) -> tuple[int, int, list[str]]:
    ident, flags, _qd, ancount = struct.unpack("!HHHH", packet[:8])
    pos = 12
    while packet[pos]:
        pos += packet[pos] + 1
    pos += 5
    addresses = []
    for _ in range(ancount):
        _ptr, qtype, _cls, _ttl, length = struct.unpack("!HHHIH", packet[pos : pos + 12])
        pos += 12
        assert qtype == QTYPE_A
        addresses.append(str(ipaddress.IPv4Address(packet[pos : pos + length])))
        pos += length
    return ident, flags & 0xF, addresses


def test_dns_answers_known_names_case_insensitively() -> None:
    records = Records({"server": ["10.1.0.2"], "api": ["10.1.0.2", "10.1.0.3"]})
    reply = records.answer(query("SERVER"))
    assert reply is not None
    assert parse_answer(reply) == (0x1234, RCODE_OK, ["10.1.0.2"])
    reply = records.answer(query("api"))
    assert reply is not None
    assert parse_answer(reply)[2] == ["10.1.0.2", "10.1.0.3"]


def test_dns_unknown_single_label_is_nxdomain_and_dotted_names_go_upstream() -> None:
    records = Records({"server": ["10.1.0.2"]})
    reply = records.answer(query("other-tenants-db"))
    assert reply is not None
    assert parse_answer(reply)[1] == RCODE_NXDOMAIN
    assert records.answer(query("example.com")) is None


def test_dns_aaaa_for_known_name_is_empty_not_nxdomain() -> None:
    reply = Records({"server": ["10.1.0.2"]}).answer(query("server", QTYPE_AAAA))
    assert reply is not None
    assert parse_answer(reply) == (0x1234, RCODE_OK, [])


def test_dns_garbage_gets_formerr() -> None:
    reply = Records().answer(b"\x00\x01" + b"\xff" * 10)
    assert reply is not None
    assert struct.unpack("!H", reply[2:4])[0] & 0xF == RCODE_FORMERR
    assert Records().answer(b"\x00") is None


def test_host_upstreams_skips_ipv6_and_comments(tmp_path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# x\nnameserver 10.9.9.9\nnameserver fd00::1\nsearch lan\n")
    assert host_upstreams(conf) == ["10.9.9.9"]


def test_kernel_prefix_fits_interface_names() -> None:
    assert kernel_prefix("berth") == "berth"
    assert kernel_prefix("bt1a2b3c") == "bt1a2b3c"
    long = kernel_prefix("production-node-17")
    assert len(long) == 8
    assert long != kernel_prefix("production-node-18")
    assert len(long + "v" + "abcdef") <= 15


def test_render_isolates_bridges_and_publishes_ports() -> None:
    script = firewall.render(
        "bx",
        [firewall.BridgeRule("bxb1", "10.1.0.0/24", "10.1.0.1")],
        [firewall.DnatRule("", 8080, "tcp", "10.1.0.2", 80)],
    )
    assert "delete table ip bx" in script
    assert "tcp dport 8080 dnat to 10.1.0.2:80" in script
    assert '"bxb1" . 10.1.0.1' in script  # DNS allowed on the gateway only
    assert "169.254.0.0/16 drop" in script


@pytest.mark.parametrize(
    "subnet",
    ["10.1.0.0/33", "10.1.0.1/24", "nonsense", "8.8.8.0/24", "169.254.0.0/24", "10.0.0.0/30"],
)
def test_bad_subnets_are_refused(subnet: str) -> None:
    with pytest.raises(InvalidArgument):
        _parse_subnet(subnet)


@pytest.mark.parametrize(
    "port",
    [
        PortMapping(container_port=0),
        PortMapping(container_port=70000),
        PortMapping(container_port=80, host_port=65536),
        PortMapping(container_port=80, host_ip="not-an-ip"),
        PortMapping(container_port=80, protocol="sctp"),  # type: ignore[arg-type]
    ],
)
def test_bad_ports_are_refused(port: PortMapping) -> None:
    with pytest.raises(InvalidArgument):
        _check_port(port)


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("80", [PortMapping(80)]),
        ("8080:80", [PortMapping(80, 8080)]),
        ("127.0.0.1:8080:80", [PortMapping(80, 8080, "127.0.0.1")]),
        ("127.0.0.1::80/udp", [PortMapping(80, 0, "127.0.0.1", "udp")]),
        ("8000-8001:80-81", [PortMapping(80, 8000), PortMapping(81, 8001)]),
        ("53/udp", [PortMapping(53, protocol="udp")]),
    ],
)
def test_publish_flags(flag: str, expected: list[PortMapping]) -> None:
    from runtime_agent.network.flags import parse_publish

    assert parse_publish(flag) == expected


@pytest.mark.parametrize(
    "flag",
    [
        "",
        "0",
        "70000",
        "a:b",
        "1:2:3:4",
        "8000-8002:80-81",
        "80/sctp",
        "[::1]:80:80",
        "300.1.1.1:80:80",
        "90-80",
    ],
)
def test_bad_publish_flags(flag: str) -> None:
    from runtime_agent.network.flags import parse_publish

    with pytest.raises(InvalidArgument):
        parse_publish(flag)


def test_network_flags() -> None:
    from runtime_agent.network.flags import network_flags
    from runtime_agent.protocol import NetworkAttachment

    assert network_flags(None, None) == ("bridge", ())
    assert network_flags("none", None) == ("none", ())
    assert network_flags("web", ["api"]) == ("bridge", (NetworkAttachment("web", ("api",)),))
    assert network_flags(None, ["api"]) == ("bridge", (NetworkAttachment("default", ("api",)),))
    with pytest.raises(InvalidArgument):
        network_flags("host", ["api"])
