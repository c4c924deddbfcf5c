"""Typed configuration value objects for the DICOM node.

``pneumo.settings`` builds these from the product settings; ``dicom_io`` itself
never reads the environment.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ALLOW_ANY_AE",
    "DEFAULT_MAX_INFLATED_BYTES",
    "MAX_RECEIVING_PROCESSES",
    "AllowedPeer",
    "Destination",
    "ListenerConfig",
    "TLSConfig",
    "validate_ae_title",
]

# In ``ListenerConfig.allowed_aets``: accept any calling AE title, explicitly.
ALLOW_ANY_AE = "*"

# A deflated data set (PS3.5 §A.5) may inflate to at most this much: the
# largest image ``dicom_io.pixels`` decodes (2**31 bits = 256 MiB) plus room
# for the header. A deflate bomb is refused before it is spooled.
DEFAULT_MAX_INFLATED_BYTES = 288 * 1024 * 1024

# PS3.5 §6.2 (AE VR): at most 16 characters of the default character
# repertoire, no backslash or control characters; leading/trailing spaces are
# not significant.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def validate_ae_title(value: str) -> str:
    """Return ``value`` stripped.

    Raises:
        ValueError: ``value`` is not a valid AE title (PS3.5 §6.2, AE VR).
    """
    stripped = value.strip()
    if not stripped or not _AE_TITLE.match(stripped):
        raise ValueError("invalid AE title (1-16 printable characters, no backslash)")
    return stripped


@dataclass(frozen=True)
class Destination:
    """A DICOM peer that results are sent to, written ``AE@host:port``."""

    ae_title: str
    host: str
    port: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", validate_ae_title(self.ae_title))
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} out of range 1-65535")
        if not self.host:
            raise ValueError("destination host is empty")

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AE@host:port``.

        Raises:
            ValueError: ``text`` is not of that form, or a part is invalid.
        """
        match = re.fullmatch(r"\s*([^@]+)@([^:@\s]+):(\d+)\s*", text)
        if not match:
            raise ValueError(f"destination {text!r} is not of the form AE@host:port")
        return cls(ae_title=match[1], host=match[2], port=int(match[3]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class TLSConfig:
    """DICOM TLS (PS3.15 Annex B.9/B.10): our certificate and key, and the CA we trust.

    Listening: ``ca_file`` is only meaningful with ``require_client_cert``
    (mutual TLS: the client certificate must be signed by ``ca_file``);
    :class:`ListenerConfig` refuses a CA without it rather than silently
    accepting unauthenticated clients. Sending: ``ca_file`` is required, the
    peer's certificate is verified against it (``dicom_io.send``).
    """

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_client_cert: bool = False


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _peer_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's IP address, an IPv4-mapped IPv6 address as IPv4; None if not an IP."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class AllowedPeer:
    """One entry of the calling-AE allow-list, written ``AE`` or ``AE@address``.

    ``address`` is an IP address or a CIDR network, IPv4 or IPv6
    (``PACS@10.1.2.3``, ``PACS@10.1.0.0/16``, ``PACS@fd00::/64``); without it
    the AE title may call from any address. Several entries may name the same
    AE title: a caller is allowed when any entry matches. ``*`` (any AE title)
    takes no address.

    Raises:
        ValueError: an invalid AE title or address, or ``*@address``.
    """

    ae_title: str
    network: IPNetwork | None = None  # None = any address

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", validate_ae_title(self.ae_title))
        if self.ae_title == ALLOW_ANY_AE and self.network is not None:
            raise ValueError(
                f"{ALLOW_ANY_AE!r} accepts any caller from any address and takes no @address"
            )

    @classmethod
    def parse(cls, text: str) -> AllowedPeer:
        """Parse ``AE`` or ``AE@address`` (an IP address or a CIDR network).

        Raises:
            ValueError: ``text`` is not of that form, or a part is invalid.
        """
        stripped = text.strip()
        if "@" not in stripped:
            return cls(stripped)
        # The last "@" separates the address (an AE title may hold "@", an address not).
        title, _, address = stripped.rpartition("@")
        try:
            network = ipaddress.ip_network(address.strip(), strict=True)
        except ValueError:
            raise ValueError(
                "allowed peer address is not an IP address or CIDR network "
                "(e.g. AE@10.1.2.3, AE@10.1.0.0/16; host bits must be zero)"
            ) from None
        return cls(title, network)

    def allows(self, ae_title: str, address: str) -> bool:
        """True when a caller ``ae_title`` connecting from ``address`` matches this entry."""
        if ae_title.strip() != self.ae_title and self.ae_title != ALLOW_ANY_AE:
            return False
        if self.network is None:
            return True
        ip = _peer_ip(address)
        return ip is not None and ip.version == self.network.version and ip in self.network

    def __str__(self) -> str:
        if self.network is None:
            return self.ae_title
        net = self.network
        addr = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
        return f"{self.ae_title}@{addr}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only "localhost" is known to be loopback
        return False


MAX_RECEIVING_PROCESSES = 32
"""Upper bound of :attr:`ListenerConfig.receiving_processes`."""


@dataclass(frozen=True)
class ListenerConfig:
    """Everything the C-STORE/C-ECHO listener needs to run.

    Secure by default: bound to anything but a loopback address, the listener
    needs an allow-list of calling AE titles (``allowed_aets``), or ``{"*"}``
    (:data:`ALLOW_ANY_AE`) to accept any caller explicitly. An empty allow-list
    on loopback accepts any caller. Each entry is ``AE`` (from any address) or
    ``AE@address`` (an IP address or CIDR network, see :class:`AllowedPeer`);
    entries are normalised to that text, parsed into ``allowed_peers``.

    Raises:
        ValueError: an invalid AE title or peer address, ``*`` beside
            ``AE@address`` entries, a non-loopback ``host`` with an empty
            ``allowed_aets``, a ``tls.ca_file`` without
            ``tls.require_client_cert`` (or the reverse), or a limit out of range;
            the message names the field.
    """

    spool_dir: Path
    ae_title: str = "PNEUMO"
    host: str = "127.0.0.1"
    port: int = 11112  # 0 = pick a free port (tests)
    allowed_aets: frozenset[str] = field(default_factory=frozenset)  # see class docstring
    max_associations: int = 10
    max_pdu: int = 0  # 0 = unlimited
    spool_reserve_bytes: int = 500 * 1024 * 1024
    max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES
    study_quiet_seconds: float = 5.0
    study_release_grace_seconds: float = 1.0
    tls: TLSConfig | None = None
    # >1: that many processes accept associations on the port (dicom_io.receivers);
    # max_associations then holds per process
    receiving_processes: int = 1
    # Parsed from ``allowed_aets``.
    allowed_peers: frozenset[AllowedPeer] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", validate_ae_title(self.ae_title))
        try:
            peers = frozenset(AllowedPeer.parse(a) for a in self.allowed_aets)
        except ValueError as exc:
            # No entry echoed: the message names the field and the rule only.
            raise ValueError(f"ListenerConfig.allowed_aets holds an invalid entry: {exc}") from None
        if any(p.ae_title == ALLOW_ANY_AE for p in peers) and any(p.network for p in peers):
            raise ValueError(
                f"ListenerConfig.allowed_aets: {ALLOW_ANY_AE!r} accepts any caller from any "
                "address, so AE@address entries beside it would restrict nothing"
            )
        allowed = frozenset(str(p) for p in peers)
        object.__setattr__(self, "allowed_aets", allowed)
        object.__setattr__(self, "allowed_peers", peers)
        if not allowed and not _is_loopback(self.host):
            raise ValueError(
                "ListenerConfig.allowed_aets is empty but host is not a loopback address: "
                f"list the calling AE titles, or {ALLOW_ANY_AE!r} to accept any caller"
            )
        if self.max_inflated_bytes <= 0:
            raise ValueError("ListenerConfig.max_inflated_bytes must be positive")
        if not 1 <= self.receiving_processes <= MAX_RECEIVING_PROCESSES:
            raise ValueError(
                f"ListenerConfig.receiving_processes must be 1 to {MAX_RECEIVING_PROCESSES}"
            )
        if self.tls is not None:
            if self.tls.ca_file is not None and not self.tls.require_client_cert:
                raise ValueError(
                    "ListenerConfig.tls.ca_file is set but tls.require_client_cert is off: "
                    "clients would not be authenticated; require client certificates "
                    "or drop the CA"
                )
            if self.tls.require_client_cert and self.tls.ca_file is None:
                raise ValueError(
                    "ListenerConfig.tls.require_client_cert needs tls.ca_file to verify "
                    "client certificates"
                )

    @property
    def allows_any_calling_ae(self) -> bool:
        """True when any calling AE title may associate (empty allow-list or ``*``)."""
        return not self.allowed_aets or ALLOW_ANY_AE in self.allowed_aets

    @property
    def allowed_calling_aets(self) -> frozenset[str]:
        """The AE titles of the allow-list, without addresses."""
        return frozenset(p.ae_title for p in self.allowed_peers)

    @property
    def restricts_peer_addresses(self) -> bool:
        """True when some allowed AE title may call only from given addresses."""
        return any(p.network is not None for p in self.allowed_peers)

    def allows_peer(self, ae_title: str, address: str) -> bool:
        """True when calling AE ``ae_title`` may associate from IP ``address``."""
        if self.allows_any_calling_ae:
            return True
        return any(p.allows(ae_title, address) for p in self.allowed_peers)
