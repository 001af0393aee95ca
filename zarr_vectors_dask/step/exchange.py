"""Routing between tasks: exchange files (data-dependent routes, behind a
``join`` barrier) and ``pick`` (a slice of a producer's result)."""

from __future__ import annotations

import numpy as np

from ..errors import CorruptChunkError
from ..format import codecs as cdc
from ..format import naming as nm
from ..storage.store import Store
from .spec import StepSpec

__all__ = ["send_exchange", "read_exchange", "received", "join", "drop_exchange", "pick"]


def send_exchange(store: Store, routed: dict[int, dict[str, np.ndarray]], scope, kind: str,
                  sender) -> None:
    """Write each destination's columns to its exchange file."""
    store.put_many({nm.exchange_key(scope, kind, d, sender): cdc.pack_columns(cols)
                    for d, cols in routed.items()})


def read_exchange(store: Store, keys: list[str]) -> list[dict[str, np.ndarray]]:
    """The columns of exchange files, in ``keys`` order; every one must exist."""
    raw = store.get_many(keys)
    out = []
    for k in keys:
        if raw[k] is None:
            raise CorruptChunkError(f"{store.describe(k)}: exchange file is missing")
        out.append(cdc.unpack_columns(raw[k], what=store.describe(k)))
    return out


def received(spec: StepSpec, kind: str, receiver: int) -> list[tuple[int, dict]]:
    """Every exchange file addressed to ``receiver``, by sender.  Which
    senders wrote one depends on the data, so the receiver lists its own
    folder (it runs after a join on all senders) instead of being told."""
    folder = nm.exchange_key(spec.target_level, kind, receiver, "").rstrip("/")
    senders = sorted(int(s) for s in spec.store.listdir(folder) if s.isdigit())
    keys = [nm.exchange_key(spec.target_level, kind, receiver, s) for s in senders]
    return list(zip(senders, read_exchange(spec.store, keys)))


def join(*_done) -> None:
    """A barrier: its dependents start once every sender has finished."""
    return None


def drop_exchange(store: Store, scope) -> None:
    """Remove a step's exchange files (scratch), and their folder once empty."""
    store.remove_tree(f"{nm.EXCHANGE_DIR}/{scope}")
    if not store.listdir(nm.EXCHANGE_DIR):
        store.remove_tree(nm.EXCHANGE_DIR)


def pick(result: dict, *path):
    for p in path:
        result = result.get(p) if isinstance(result, dict) else None
        if result is None:
            return None
    return result
