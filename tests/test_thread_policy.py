"""The thread policy (ops/device.py): small maths single-threaded, the faster setting measured,
never much slower than single-threaded, results and errors in order."""

from __future__ import annotations

import threading

import pytest
import torch

from loratool.errors import UsageError
from loratool.ops.device import EXPLORE_SHARE, UNTRIED_SLOWDOWN, Race, ThreadPolicy, check_threads, torch_threads


def _simulate(race: Race, rates: dict, calls: int, cost: float = 1.0) -> tuple[float, list]:
    """Run ``calls`` jobs whose time is rates[setting] * cost; returns (total time, settings used)."""
    total, used = 0.0, []
    for _ in range(calls):
        s = race.pick(cost)
        t = rates[s] * cost
        race.record(s, t, cost)
        total += t
        used.append(s)
    return total, used


def test_race_tries_each_setting_then_keeps_the_fastest_within_the_exploration_budget():
    race = Race([1, 2])
    total, used = _simulate(race, {1: 1.0, 2: 10.0}, 200)
    assert used[0] == 1 and 2 in used  # the safe setting first; the other once the credit allows
    # an untried setting may lose (UNTRIED_SLOWDOWN - 1) runs' time: that many twentieths of the runs earn it
    assert used.index(2) >= (UNTRIED_SLOWDOWN - 1) / EXPLORE_SHARE
    best = 200 * 1.0
    # what the slow setting lost stays within EXPLORE_SHARE of the time, plus one try's loss
    assert total - best <= EXPLORE_SHARE * total + (10.0 - 1.0)
    assert total / best < 1.15
    fast = Race([1, 2])
    _, used = _simulate(fast, {1: 1.0, 2: 0.4}, 300)
    assert used[-30:].count(2) >= 28  # once measured faster, it is kept (the other re-tried now and then)


def test_race_follows_a_change_of_load():
    race = Race([1, 2])
    _, used = _simulate(race, {1: 1.0, 2: 0.5}, 400)  # idle: two threads are faster (tried once credit allows)
    assert used[-40:].count(2) >= 35
    _, used = _simulate(race, {1: 1.0, 2: 5.0}, 300)  # a core got busy: two threads are now slow
    assert used[-50:].count(1) >= 45


def test_torch_threads_restores_the_setting():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_small_maths_is_single_threaded_and_threads_one_means_one():
    policy = ThreadPolicy(1, "cpu")
    seen = []
    out = list(policy.map(lambda x: (seen.append(torch.get_num_threads()), x * 2)[1], range(10)))
    assert out == [2 * x for x in range(10)] and set(seen) == {1}
    with policy.large(1e12) as n:
        assert n == 1 and torch.get_num_threads() == 1
    with ThreadPolicy(None, "cpu").small():
        assert torch.get_num_threads() == 1


def test_map_keeps_order_and_uses_every_setting_with_several_threads():
    policy = ThreadPolicy(2, "cpu")
    policy._map = Race(["serial", "pool", "threads"], explore_share=1.0)  # short work: let it try everything
    threads_seen: set[str] = set()

    def work(x):
        threads_seen.add(threading.current_thread().name.split("_")[0])
        return x * x

    items = list(range(200))
    assert list(policy.map(work, items, cost=lambda x: 1.0 + x)) == [x * x for x in items]
    assert set(policy._map.rate) == {"serial", "pool", "threads"}
    assert all(r is not None for r in policy._map.rate.values())  # each setting was measured
    assert any(name.startswith("loratool-maths") for name in threads_seen)


def test_map_propagates_the_first_error():
    policy = ThreadPolicy(2, "cpu")

    def work(x):
        if x == 13:
            raise ValueError("bad module")
        return x

    with pytest.raises(ValueError, match="bad module"):
        list(policy.map(work, range(40)))
    assert torch.get_num_threads() >= 1


def test_bad_thread_counts_are_usage_errors():
    for bad in (0, -2, True):
        with pytest.raises(UsageError, match="--threads"):
            check_threads(bad)
    assert check_threads(None) is None and check_threads(3) == 3


def test_cli_threads_option(tmp_path, capsys):
    from pathlib import Path

    from loratool.cli import main

    fixture = Path(__file__).resolve().parent.parent / "fixtures" / "kohya_tiny_sd.safetensors"
    assert main(["resize", str(fixture), "-r", "2", "-o", str(tmp_path / "a.safetensors"), "--threads", "1",
                 "--json"]) == 0
    assert main(["resize", str(fixture), "-r", "2", "-o", str(tmp_path / "b.safetensors"), "--threads", "2",
                 "--json"]) == 0
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # the same maths; another thread count may round the float64 work in another order: 1 fp16 ulp
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-6)
    capsys.readouterr()
    assert main(["resize", str(fixture), "-r", "2", "-o", str(tmp_path / "c.safetensors"), "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_ops_run_single_threaded_outside_measured_maths_and_restore_the_setting(monkeypatch):
    from loratool.adapter import Adapter, LoraModule
    from loratool.ops import resize as resize_mod

    seen: list[int] = []
    real = resize_mod._update_metadata

    def spy(*args, **kwargs):  # bookkeeping after the modules: not measured maths
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(resize_mod, "_update_metadata", spy)
    adapter = Adapter()
    adapter.add(LoraModule("unet", "a", tensors={"down": torch.randn(4, 8), "up": torch.randn(6, 4)}))
    with torch_threads(2):
        resize_mod.resize(adapter, 2, device="cpu")
        assert torch.get_num_threads() == 2
    assert seen == [1]
