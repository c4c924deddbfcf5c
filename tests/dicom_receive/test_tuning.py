"""The listener's speed tweaks keep pynetdicom's semantics."""

from __future__ import annotations

import copy
import time

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES
from pynetdicom.presentation import PresentationContext

from dicom_io.listener import storage_sop_classes
from dicom_io.tuning import server_contexts


def _ae() -> AE:
    ae = AE()
    for uid in storage_sop_classes():
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    return ae


def test_server_contexts_deep_copy_like_the_originals():
    """pynetdicom deep-copies these per association: the copy must be independent and equal."""
    ae = _ae()
    originals = ae.supported_contexts
    ours = server_contexts(ae)
    copies = copy.deepcopy(ours)
    assert len(copies) == len(originals) > 100
    for original, mine, copied in zip(originals, ours, copies, strict=True):
        assert isinstance(copied, PresentationContext)
        assert copied == original  # pynetdicom's own equality
        assert vars(copied) == vars(original)
        assert copied.transfer_syntax == list(ALL_TRANSFER_SYNTAXES)
        # Independent lists: mutating one association's copy changes nothing else.
        assert copied._transfer_syntax is not mine._transfer_syntax
    copies[0].transfer_syntax = [ALL_TRANSFER_SYNTAXES[0]]
    assert ours[0].transfer_syntax == list(ALL_TRANSFER_SYNTAXES)


def test_server_contexts_copy_is_much_cheaper_than_pynetdicoms():
    ae = _ae()
    ours = server_contexts(ae)
    plain = ae.supported_contexts
    t = time.perf_counter()
    copy.deepcopy(plain)
    plain_s = time.perf_counter() - t
    t = time.perf_counter()
    copy.deepcopy(ours)
    ours_s = time.perf_counter() - t
    assert ours_s * 5 < plain_s


def test_set_nodelay_sets_the_option_and_ignores_non_sockets():
    import socket

    from dicom_io.tuning import set_nodelay

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        set_nodelay(sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    set_nodelay(None)  # no socket (e.g. a closed association): nothing happens
