"""Rank 0 decides for every process (:func:`beyond_cls.probe.claims.on_main`): its result, or its error, reaches
every rank, so none is left waiting in a collective the failed one never enters."""

from __future__ import annotations

import pytest
import torch

from beyond_cls.config import ConfigError
from beyond_cls.probe import claims
from beyond_cls.probe.distributed import DistEnv


def _ranks(monkeypatch, action) -> list[object]:
    """``on_main(action)`` on rank 0 then rank 1 of two, the gather handing rank 1 what rank 0 sent; per rank its
    result or the exception it raised."""
    sent: list[object] = []
    gather = lambda obj, env: sent.append(obj) or [sent[0], obj]  # rank 0's object first, as all_gather gives it
    monkeypatch.setattr(claims, "all_gather_objects", gather)
    calls, outcomes = [], []
    for rank in (0, 1):
        env = DistEnv(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        try:
            outcomes.append(claims.on_main(env, lambda rank=rank: calls.append(rank) or action()))
        except Exception as exc:
            outcomes.append(exc)
    assert calls == [0]  # the action runs on rank 0 only
    return outcomes


def test_rank_zeros_result_reaches_every_rank(monkeypatch):
    assert _ranks(monkeypatch, lambda: [True, False]) == [[True, False], [True, False]]


@pytest.mark.parametrize("error, message", [(FileNotFoundError("no such file x"), "no such file x"),
                                            (KeyError(), "KeyError")])
def test_rank_zeros_error_is_raised_on_every_rank(monkeypatch, error, message):
    def fail():
        raise error

    first, second = _ranks(monkeypatch, fail)
    assert first is error  # rank 0: its own exception, traceback and type
    assert type(second) is ConfigError and str(second) == message  # the others: one line saying why


def test_one_process_gathers_nothing(monkeypatch):
    monkeypatch.setattr(claims, "all_gather_objects", lambda obj, env: pytest.fail("gathered with one process"))
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert claims.on_main(env, lambda: 7) == 7

    def fail():
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        claims.on_main(env, fail)
