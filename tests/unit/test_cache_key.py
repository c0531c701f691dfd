"""The cache key: named components hashed separately, combined in a fixed order."""

from __future__ import annotations

import hashlib
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xla_backend.cache import key as key_module
from xla_backend.cache.key import (
    COMPONENT_NAMES,
    CacheKey,
    MissExplanation,
    backend_key,
    component_hash,
    explain_miss,
    scrub_xla_flags,
)


def _backend_values(**overrides: str) -> dict[str, str]:
    values = {name: f"value of {name}" for name in COMPONENT_NAMES}
    values.update(overrides)
    return values


def test_component_names_are_the_documented_fixed_order():
    assert COMPONENT_NAMES == (
        "graph", "input_signature", "passes_version", "torch_version", "torch_xla_version",
        "xla_flags", "device_kind", "device_count", "sharding", "options",
    )
    assert key_module.GRAPH == "graph" and key_module.OPTIONS == "options"


def test_each_component_is_hashed_separately_with_sha256():
    key = CacheKey([("graph", "g"), ("blob", b"\x00\x01")])
    assert list(key.components) == ["graph", "blob"]
    assert key.component_hashes == {
        "graph": hashlib.sha256(b"g").hexdigest(),
        "blob": hashlib.sha256(b"\x00\x01").hexdigest(),
    }
    assert component_hash("é") == hashlib.sha256("é".encode()).hexdigest()
    assert len(key.digest) == 64 and int(key.digest, 16) >= 0


def test_digest_is_deterministic_and_accepts_a_mapping():
    assert CacheKey([("a", "1"), ("b", "2")]).digest == CacheKey({"a": "1", "b": "2"}).digest


def test_digest_depends_on_order_names_and_values():
    base = CacheKey([("a", "1"), ("b", "2")]).digest
    assert CacheKey([("b", "2"), ("a", "1")]).digest != base
    assert CacheKey([("a", "1"), ("c", "2")]).digest != base
    assert CacheKey([("a", "1"), ("b", "3")]).digest != base
    # Framing: moving characters between a name and its neighbour must not collide.
    assert CacheKey([("ab", "x")]).digest != CacheKey([("a", "bx")]).digest


def test_changing_one_component_changes_only_its_hash():
    before = backend_key(_backend_values())
    after = backend_key(_backend_values(xla_flags="--xla_cpu_use_thunk_runtime=false"))
    assert before.digest != after.digest
    changed = [n for n in COMPONENT_NAMES
               if before.component_hashes[n] != after.component_hashes[n]]
    assert changed == ["xla_flags"]


def test_each_component_hash_is_logged_at_debug_level(caplog):
    caplog.set_level(logging.DEBUG, logger="xla_backend.cache.key")
    key = backend_key(_backend_values())
    text = caplog.text
    for name in COMPONENT_NAMES:
        assert f"{name}: {key.component_hashes[name]}" in text
    assert key.digest in text


def test_bad_components_are_rejected():
    with pytest.raises(ValueError, match="twice"):
        CacheKey([("a", "1"), ("a", "2")])
    with pytest.raises(ValueError, match="name"):
        CacheKey([("", "1")])
    with pytest.raises(TypeError, match="str or bytes"):
        CacheKey([("a", 1)])  # type: ignore[list-item]


def test_key_is_immutable_and_hashable():
    key = CacheKey([("a", "1")])
    with pytest.raises(AttributeError):
        key.digest = "0" * 64  # type: ignore[misc]
    assert {key, CacheKey([("a", "1")])} == {key}


def test_backend_key_uses_the_fixed_order_whatever_the_mapping_order():
    values = _backend_values()
    reversed_values = dict(reversed(list(values.items())))
    key = backend_key(reversed_values)
    assert tuple(key.components) == COMPONENT_NAMES
    assert key.digest == backend_key(values).digest
    assert key.digest == CacheKey([(n, values[n]) for n in COMPONENT_NAMES]).digest


def test_backend_key_refuses_missing_or_unknown_components():
    values = _backend_values()
    del values["device_kind"]
    with pytest.raises(ValueError, match="device_kind"):
        backend_key(values)
    with pytest.raises(ValueError, match="colour"):
        backend_key(_backend_values(colour="blue"))


def test_explain_miss_names_the_components_differing_from_the_nearest_entry():
    wanted = backend_key(_backend_values(graph="new graph", xla_flags="--new"))
    far = backend_key(_backend_values(graph="g2", xla_flags="f2", options="o2", device_kind="k"))
    near = backend_key(_backend_values(xla_flags="--old"))
    existing = {far.digest: dict(far.component_hashes), near.digest: dict(near.component_hashes)}
    explanation = explain_miss(wanted, existing)
    assert explanation == MissExplanation(near.digest, ("graph", "xla_flags"))
    assert "graph, xla_flags" in str(explanation)
    # Plain component-hash maps work as the key too.
    assert explain_miss(dict(wanted.component_hashes), existing) == explanation


def test_explain_miss_edge_cases():
    key = CacheKey([("a", "1"), ("b", "2")])
    assert explain_miss(key, {}) is None
    same = explain_miss(key, {key.digest: dict(key.component_hashes)})
    assert same is not None and same.differing == ()
    # An entry lacking a component, or carrying an extra one, differs in it.
    partial = {"a": key.component_hashes["a"], "c": "00"}
    assert explain_miss(key, {"e" * 64: partial}).differing == ("b", "c")
    # Ties go to the smallest digest, so the answer does not depend on dict order.
    tie = {"f" * 64: {"a": "x", "b": key.component_hashes["b"]},
           "1" * 64: {"a": key.component_hashes["a"], "b": "y"}}
    assert explain_miss(key, tie).nearest_digest == "1" * 64


@given(
    st.dictionaries(st.text(min_size=1, max_size=8), st.binary(max_size=16), min_size=1,
                    max_size=6),
    st.data(),
)
def test_explain_miss_reports_exactly_the_changed_components(values, data):
    names = list(values)
    changed = data.draw(st.sets(st.sampled_from(names)))
    other = {n: (values[n] + b"!" if n in changed else values[n]) for n in names}
    a, b = CacheKey(values), CacheKey(other)
    assert (a.digest == b.digest) == (not changed)
    explanation = explain_miss(a, {b.digest: dict(b.component_hashes)})
    assert set(explanation.differing) == changed


def test_scrub_xla_flags_drops_only_debug_only_flags():
    flags = (
        '--xla_cpu_enable_fast_math=false  --xla_dump_to="/tmp/dump dir" '
        "--xla_dump_hlo_as_text --xla_enable_dumping=true --xla_hlo_profile "
        "--xla_force_host_platform_device_count=4"
    )
    assert scrub_xla_flags(flags) == (
        "--xla_cpu_enable_fast_math=false --xla_hlo_profile "
        "--xla_force_host_platform_device_count=4"
    )
    assert scrub_xla_flags(None) == scrub_xla_flags("") == ""
    assert scrub_xla_flags("--xla_dump_to=/x") == ""


def test_turning_on_dumps_does_not_change_the_key():
    plain = "--xla_cpu_enable_fast_math=false"
    dumping = "--xla_dump_to=/tmp/d --xla_cpu_enable_fast_math=false --xla_dump_hlo_as_proto"
    assert (backend_key(_backend_values(xla_flags=scrub_xla_flags(plain))).digest
            == backend_key(_backend_values(xla_flags=scrub_xla_flags(dumping))).digest)
