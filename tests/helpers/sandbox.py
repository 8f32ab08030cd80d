"""Verdicts of the sandbox fault probes (tests/e2e/test_faults_sandbox*.py): which probes a layer
cannot stop, and why (``admitted``), and failing a test when any other probe escaped
(``verdict``). The layer under test comes from conftest's ``layer`` fixture."""

from __future__ import annotations

import os

import pytest

from nanochat.inference.sandbox import Layer


def admitted(layer: Layer) -> dict[str, str]:
    """The probes ``layer`` cannot stop, and why (its startup line says so too)."""
    if layer.name == "bwrap":
        return {}
    why = {"socket": "the guard alone has no network namespace: loopback is reachable"}
    if not layer.drop_uid:
        same_uid = "the program runs with the caller's uid, which may do this"
        for probe in ("posix_write", "fileio_create", "posix_unlink", "posix_rename"):
            why[probe] = same_uid
        why["exec_write"] = same_uid
        why["environ"] = "the parent's /proc/<pid>/environ is readable by its own uid"
        if os.geteuid() == 0:  # root whose switch to uid 65534 failed: no RLIMIT_NPROC
            why["posix_fork"] = why["grandchild"] = "root ignores RLIMIT_NPROC"
    return why


def verdict(probe: str, layer: Layer, escaped: bool) -> None:
    """Fail unless ``probe`` stayed in, or is one ``layer`` documents it cannot stop."""
    if not escaped:
        return
    if probe not in admitted(layer):  # an admitted one is the documented limit of the layer
        pytest.fail(f"probe {probe} escaped the {layer.name} layer ({layer.description()})")
