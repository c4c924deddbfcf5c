"""Typed configuration value objects for the DICOM node.

``pneumo.settings`` builds these from the product settings; ``dicom_io`` itself
never reads the environment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

# PS3.5 §6.2 (AE VR): at most 16 characters of the default character
# repertoire, no backslash or control characters; leading/trailing spaces are
# not significant.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def validate_ae_title(value: str) -> str:
    """Return ``value`` stripped, or raise ``ValueError`` if it is not a valid AE title."""
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
    def parse(cls, text: str) -> "Destination":
        match = re.fullmatch(r"\s*([^@]+)@([^:@\s]+):(\d+)\s*", text)
        if not match:
            raise ValueError(f"destination {text!r} is not of the form AE@host:port")
        return cls(ae_title=match[1], host=match[2], port=int(match[3]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class TLSConfig:
    """DICOM TLS (PS3.15 Annex B.9/B.10): our certificate and key, and the CA we trust.

    With ``require_client_cert`` the listener demands a client certificate signed
    by ``ca_file`` (mutual TLS).
    """

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_client_cert: bool = False


@dataclass(frozen=True)
class ListenerConfig:
    """Everything the C-STORE/C-ECHO listener needs to run."""

    spool_dir: Path
    ae_title: str = "PNEUMO"
    host: str = "0.0.0.0"
    port: int = 11112  # 0 = pick a free port (tests)
    allowed_aets: frozenset[str] = field(default_factory=frozenset)  # empty = any
    max_associations: int = 10
    max_pdu: int = 0  # 0 = unlimited
    spool_reserve_bytes: int = 500 * 1024 * 1024
    max_image_pixels_bits: int = 16384 * 16384 * 16
    study_quiet_seconds: float = 5.0
    study_release_grace_seconds: float = 1.0
    tls: TLSConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", validate_ae_title(self.ae_title))
        object.__setattr__(
            self, "allowed_aets", frozenset(validate_ae_title(a) for a in self.allowed_aets)
        )
