"""The local service's speed profile: measured on the tiny model, keyed, cached, invalidated."""

from __future__ import annotations

import json
from importlib import metadata

import pytest
from conftest import TINY, hand_profile, needs_backend

pytestmark = needs_backend


@pytest.fixture(scope="module")
def runtime():
    from engine.backends.local.compute import BaseRuntime

    return BaseRuntime(TINY)


def _threads() -> int:
    import torch

    return torch.get_num_threads()  # the count torch runs with now: nothing is changed


def fake_profile(key, **kw):
    values = dict(
        optim_step_s=0.1,
        request_s=0.05,
        prompt_tokens_per_s=800.0,
        context_s_per_token=1e-5,
        checkpoint_s=0.5,
        measure_s=3.0,
        measured_at="2025-01-01T00:00:00",
    )
    return hand_profile(key, **{**values, **kw})


def test_measure_on_the_tiny_model(sp, runtime):
    from engine.backends.local import hardware

    p = sp.measure_profile(runtime, model=TINY, threads=_threads(), load_s=0.25)
    for rate in (p.prefill_tokens_per_s, p.train_tokens_per_s, p.prompt_tokens_per_s):
        assert rate > 0
    assert sorted(p.decode_tokens_per_s) == [1, 8, 32]
    assert all(r > 0 for r in p.decode_tokens_per_s.values())
    assert p.request_s >= 0 and p.context_s_per_token >= 0 and p.optim_step_s >= 0
    assert p.checkpoint_s > 0 and p.measure_s > 0 and p.load_s == 0.25
    k = p.key
    assert k.model == TINY
    assert k.device == runtime.plan.device == "cpu"
    assert k.dtype == runtime.plan.dtype_name
    assert k.threads == _threads()
    assert k.torch == metadata.version("torch")
    assert k.cpu == hardware.cpu_model_name()
    assert list(k.cpu_flags) == hardware.reported_cpu_flags()
    assert k.version == sp.PROFILE_VERSION
    # the adapter used for training is gone again
    assert not any(name.startswith("speed-") for name in runtime.host.specs)


def test_json_round_trip(sp):
    key = sp.profile_key(TINY, _plan(), 2)
    p = fake_profile(key)
    back = sp.SpeedProfile.from_dict(json.loads(json.dumps(p.to_dict())))
    assert back == p
    assert back.decode_tokens_per_s == {1: 10.0, 8: 40.0, 32: 80.0}


def _plan():
    from engine.backends.local.models import choose_compute

    return choose_compute()


def test_ensure_profile_measures_once_then_reads_the_cache(sp, monkeypatch):
    calls = []
    real = sp.measure_profile

    def counting(runtime, **kw):
        calls.append(kw["model"])
        return real(runtime, **kw)

    monkeypatch.setattr(sp, "measure_profile", counting)
    first = sp.ensure_profile(TINY, threads=_threads())
    assert calls == [TINY]
    assert first.load_s > 0
    files = list((sp.speed_dir()).glob("profile-*.json"))
    assert [f.name for f in files] == [first.key.file_name()]
    again = sp.ensure_profile(TINY, threads=_threads())
    assert calls == [TINY]  # read from the cache
    assert again == first
    assert sp.load_profile(first.key) == first
    sp.ensure_profile(TINY, threads=_threads(), remeasure=True)
    assert calls == [TINY, TINY]


def test_measuring_runs_on_a_thread_that_ends_with_it(sp, monkeypatch):
    """Torch work leaves an OpenMP team with the thread that ran it; a team left in the
    app's pool threads would slow every later stage, so the measurement gets its own."""
    import threading

    seen = []
    real = sp.measure_profile

    def recording(runtime, **kw):
        seen.append(threading.current_thread())
        return real(runtime, **kw)

    monkeypatch.setattr(sp, "measure_profile", recording)
    sp.ensure_profile(TINY, threads=_threads())
    assert len(seen) == 1 and seen[0] is not threading.current_thread()
    assert not seen[0].is_alive()

    def failing(runtime, **kw):
        raise sp.MeasureStopped()

    monkeypatch.setattr(sp, "measure_profile", failing)
    with pytest.raises(sp.MeasureStopped):  # an error reaches the caller
        sp.ensure_profile(TINY, threads=_threads(), remeasure=True)


def _fake_measure(sp, monkeypatch, calls):
    def fake(runtime, *, model=None, threads=None, load_s=0.0, should_stop=None):
        calls.append(model)
        return fake_profile(sp.profile_key(model, runtime.plan, threads), load_s=load_s)

    monkeypatch.setattr(sp, "measure_profile", fake)


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # torn
        lambda text: "not json at all",
        lambda text: json.dumps({**json.loads(text), "train_tokens_per_s": -3}),
        lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "request_s"}),
        lambda text: "\xff\xfe",
    ],
)
def test_a_corrupt_cache_file_is_measured_again(sp, monkeypatch, damage):
    calls: list = []
    _fake_measure(sp, monkeypatch, calls)
    first = sp.ensure_profile(TINY, threads=_threads())
    path = sp.speed_dir() / first.key.file_name()
    path.write_text(damage(path.read_text(encoding="utf-8")), encoding="utf-8")
    assert sp.load_profile(first.key) is None
    assert sp.nearest_profile(first.key) is None
    again = sp.ensure_profile(TINY, threads=_threads())
    assert calls == [TINY, TINY]
    assert sp.load_profile(again.key) == again  # and the cache is good again


def test_a_new_profile_version_ignores_old_profiles(sp, monkeypatch):
    calls: list = []
    _fake_measure(sp, monkeypatch, calls)
    old = sp.ensure_profile(TINY, threads=_threads())
    assert sp.load_profile(old.key) == old
    monkeypatch.setattr(sp, "PROFILE_VERSION", sp.PROFILE_VERSION + 1)
    key = sp.profile_key(TINY, _plan(), _threads())
    assert key.version == old.key.version + 1
    assert sp.load_profile(key) is None
    assert sp.nearest_profile(key) is None
    assert sp.load_profile(old.key) is None  # an old file read by its own key: stale too
    new = sp.ensure_profile(TINY, threads=_threads())
    assert calls == [TINY, TINY]
    assert new.key.version == old.key.version + 1


def test_another_thread_count_is_the_nearest_profile(sp):
    plan = _plan()
    for threads in (1, 4):
        sp.save_profile(fake_profile(sp.profile_key(TINY, plan, threads)))
    key3 = sp.profile_key(TINY, plan, 3)
    assert sp.load_profile(key3) is None
    assert sp.nearest_profile(key3).key.threads == 4
    assert sp.nearest_profile(sp.profile_key(TINY, plan, 2)).key.threads == 1
    other_model = sp.profile_key("some/other-model", plan, 4)
    assert sp.nearest_profile(other_model) is None


def test_decode_rate_interpolates_between_the_measured_batches(sp):
    p = fake_profile(sp.profile_key(TINY, _plan(), 1))
    assert p.decode_rate(1) == pytest.approx(10.0)
    assert p.decode_rate(8) == pytest.approx(40.0)
    assert p.decode_rate(32) == pytest.approx(80.0)
    assert 10.0 < p.decode_rate(4) < 40.0
    assert 40.0 < p.decode_rate(16) < 80.0
    assert 80.0 <= p.decode_rate(64) <= 160.0  # beyond what was measured: never superlinear
    # a step of 8 rows at no context: 8 rows / 40 tok/s; context adds per row and token
    assert p.step_s(8, 0) == pytest.approx(0.2)
    assert p.step_s(8, 100) == pytest.approx(0.2 + 8 * 100 * 1e-5)
    assert p.join_s(16) == pytest.approx(0.05)
    assert p.join_s(816) == pytest.approx(0.05 + 800 / 800.0)


def test_measuring_stops_when_asked(sp, runtime):
    with pytest.raises(sp.MeasureStopped):
        sp.measure_profile(runtime, model=TINY, threads=_threads(), should_stop=lambda: True)
    assert not any(name.startswith("speed-") for name in runtime.host.specs)


def test_persona_speed_measures_once_then_shows_the_cache(sp, ws, capsys, monkeypatch):
    from persona_cli import main

    calls: list = []
    real = sp.measure_profile

    def counting(runtime, **kw):
        calls.append(kw["model"])
        return real(runtime, **kw)

    monkeypatch.setattr(sp, "measure_profile", counting)
    assert main(["-C", str(ws.root), "speed"]) == 0
    out = capsys.readouterr().out
    assert "measuring this machine's speed" in out
    assert f"{TINY} on cpu" in out and "tok/s" in out
    assert str(sp.speed_dir()) in out.replace("\n", "")
    assert "baseline" in out and "evaluate" in out  # each stage's estimate
    assert calls == [TINY]
    assert main(["-C", str(ws.root), "speed", "--set", "sampling.max_tokens=8"]) == 0
    out = capsys.readouterr().out
    assert "measuring" not in out and calls == [TINY]  # the cached profile
    assert main(["-C", str(ws.root), "speed", "--remeasure"]) == 0
    assert calls == [TINY, TINY]
    assert main(["-C", str(ws.root), "speed", "--set", "nosuch.key=1"]) == 2
