"""Allowed peer addresses per calling AE title (``AE@address``), over real associations.

Loopback only: the listener binds 127.0.0.1; the client connects from 127.0.0.1
or binds its socket to 127.0.0.2 (Linux routes all of 127.0.0.0/8 to loopback).
"""

from __future__ import annotations

import logging

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_io.listener import Listener

# PS3.8 §7.1.1.9: rejected permanent, service user, calling AE title not recognised.
CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)


def _associate(listener: Listener, calling: str, source: str = "127.0.0.1") -> tuple[str, object]:
    """Associate as ``calling`` from ``source``; ("echo-ok", status) or ("rejected", rsd)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PNEUMO", bind_address=(source, 0))
    if assoc.is_rejected:
        rej = assoc.acceptor.primitive
        return "rejected", (rej.result, rej.result_source, rej.diagnostic)
    assert assoc.is_established, "neither established nor rejected"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    return "echo-ok", int(status.Status)


def test_allowed_ae_accepted_from_its_address(make_listener) -> None:
    listener, _ = make_listener(allowed_aets=frozenset({"PACS@127.0.0.1"}))
    assert _associate(listener, "PACS") == ("echo-ok", 0x0000)
    # An unknown AE title is still rejected, as before.
    assert _associate(listener, "STRANGER") == ("rejected", CALLING_AE_NOT_RECOGNISED)


def test_allowed_ae_from_another_address_rejected_like_an_unknown_ae(
    make_listener, caplog: pytest.LogCaptureFixture
) -> None:
    listener, _ = make_listener(allowed_aets=frozenset({"PACS@127.0.0.2/32"}))
    with caplog.at_level(logging.WARNING, logger="dicom_io.listener"):
        assert _associate(listener, "PACS") == ("rejected", CALLING_AE_NOT_RECOGNISED)
    assert "association from PACS at 127.0.0.1 rejected: address not allowed" in caplog.text
    # From the allowed address (a second loopback address) the same AE is accepted.
    assert _associate(listener, "PACS", source="127.0.0.2") == ("echo-ok", 0x0000)
    assert listener.stats["stored"] == 0


def test_entries_for_one_ae_add_up_and_bare_titles_keep_any_address(make_listener) -> None:
    listener, _ = make_listener(
        allowed_aets=frozenset({"PACS@127.0.0.3", "PACS@127.0.0.2/32", "MODALITY"})
    )
    assert _associate(listener, "PACS", source="127.0.0.2") == ("echo-ok", 0x0000)
    assert _associate(listener, "PACS", source="127.0.0.3") == ("echo-ok", 0x0000)
    assert _associate(listener, "PACS") == ("rejected", CALLING_AE_NOT_RECOGNISED)
    assert _associate(listener, "MODALITY") == ("echo-ok", 0x0000)
    assert _associate(listener, "MODALITY", source="127.0.0.2") == ("echo-ok", 0x0000)


def test_a_network_allows_every_address_in_it(make_listener) -> None:
    listener, _ = make_listener(allowed_aets=frozenset({"PACS@127.0.0.0/30"}))
    for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        assert _associate(listener, "PACS", source=source) == ("echo-ok", 0x0000), source
    assert _associate(listener, "PACS", source="127.0.0.4") == (
        "rejected",
        CALLING_AE_NOT_RECOGNISED,
    )


def test_a_failing_address_check_rejects(make_listener, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_io.config import ListenerConfig

    listener, _ = make_listener(allowed_aets=frozenset({"PACS@127.0.0.1"}))

    def broken(self: ListenerConfig, ae_title: str, address: str) -> bool:
        raise RuntimeError("boom")

    monkeypatch.setattr(ListenerConfig, "allows_peer", broken)
    assert _associate(listener, "PACS") == ("rejected", CALLING_AE_NOT_RECOGNISED)
