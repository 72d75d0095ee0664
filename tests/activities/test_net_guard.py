"""The SSRF guard: which addresses are refused, and what an allow-list can (and cannot) open."""

from __future__ import annotations

import ipaddress

import pytest

from activities.errors import AssetError
from activities.net_guard import AddressPolicy, check_address, resolve_checked
from workflows.contracts import ErrorCode
from workflows.net_addresses import forbidden_category


@pytest.mark.parametrize(
    ("address", "category"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd12::1", "private"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "non-global"),  # carrier-grade NAT
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped IPv6 is judged by its IPv4 address
        ("::ffff:10.0.0.1", "private"),
        ("2002:0a00:0001::1", "private"),  # 6to4 carrying 10.0.0.1
        ("8.8.8.8", None),
        ("2001:4860:4860::8888", None),
    ],
)
def test_categories(address: str, category: str | None) -> None:
    assert forbidden_category(ipaddress.ip_address(address)) == category


def test_allow_list_opens_named_networks_only() -> None:
    policy = AddressPolicy.from_cidrs(["127.0.0.1/32", "10.20.0.0/16"])
    check_address(ipaddress.ip_address("127.0.0.1"), policy, code=ErrorCode.URL_FORBIDDEN_ADDRESS, what="t")
    check_address(ipaddress.ip_address("10.20.3.4"), policy, code=ErrorCode.URL_FORBIDDEN_ADDRESS, what="t")
    with pytest.raises(AssetError) as refused:
        check_address(
            ipaddress.ip_address("127.0.0.2"), policy, code=ErrorCode.URL_FORBIDDEN_ADDRESS, what="t"
        )
    assert refused.value.code is ErrorCode.URL_FORBIDDEN_ADDRESS and "loopback" in refused.value.message
    assert not refused.value.retryable


def test_metadata_needs_an_exact_entry_not_a_range() -> None:
    metadata = ipaddress.ip_address("169.254.169.254")
    with pytest.raises(AssetError):
        check_address(
            metadata,
            AddressPolicy.from_cidrs(["169.254.0.0/16"]),
            code=ErrorCode.URL_FORBIDDEN_ADDRESS,
            what="t",
        )
    check_address(
        metadata,
        AddressPolicy.from_cidrs(["169.254.169.254/32"]),
        code=ErrorCode.URL_FORBIDDEN_ADDRESS,
        what="t",
    )


async def test_every_resolved_address_must_pass() -> None:
    # `localhost` resolves to loopback only; with nothing allow-listed it is refused before any connection.
    with pytest.raises(AssetError) as refused:
        await resolve_checked(
            "localhost", 80, AddressPolicy(), code=ErrorCode.URL_FORBIDDEN_ADDRESS, what="host"
        )
    assert refused.value.code is ErrorCode.URL_FORBIDDEN_ADDRESS
    chosen = await resolve_checked(
        "127.0.0.1",
        80,
        AddressPolicy.from_cidrs(["127.0.0.1/32"]),
        code=ErrorCode.URL_FORBIDDEN_ADDRESS,
        what="host",
    )
    assert str(chosen) == "127.0.0.1"


@pytest.mark.parametrize("host", ["2130706433", "127.1", "0x7f.0.0.1", "0177.0.0.1"])
async def test_numeric_forms_of_loopback_resolve_to_loopback_and_are_refused(host: str) -> None:
    with pytest.raises(AssetError) as refused:
        await resolve_checked(host, 80, AddressPolicy(), code=ErrorCode.URL_FORBIDDEN_ADDRESS, what="host")
    assert refused.value.code is ErrorCode.URL_FORBIDDEN_ADDRESS and "loopback" in refused.value.message
