"""The byte-stable policy file: identical bytes for identical inputs, and every damage refused with a named error."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from stages.core import policy_file as P
from tests.test_checkpoints import init_state

META = {"agent": "rql", "obs_dim": 3, "action_dim": 1, "h": 5, "flow_steps": 10, "hidden": [8]}


def test_export_is_byte_identical_and_round_trips(tmp_path):
    params = init_state(0).params
    sha_a = P.save_policy(tmp_path / "a.msgpack", params, META)
    # Same values built independently, other dict order, numpy instead of jax, numpy scalar metadata.
    rebuilt = jax.tree.map(lambda v: np.array(v), init_state(0).params)
    rebuilt = {"params": dict(reversed(list(rebuilt["params"].items())))}
    meta_b = {**dict(reversed(list(META.items()))), "obs_dim": np.int64(3), "hidden": (8,)}
    sha_b = P.save_policy(tmp_path / "b.msgpack", rebuilt, meta_b)
    assert (tmp_path / "a.msgpack").read_bytes() == (tmp_path / "b.msgpack").read_bytes()
    assert sha_a == sha_b
    assert sorted(os.listdir(tmp_path)) == ["a.msgpack", "b.msgpack"]  # no temp files left

    loaded = P.load_policy(tmp_path / "a.msgpack", template=params, expected_metadata={"obs_dim": 3, "h": 5})
    assert loaded.metadata == META
    assert jax.tree_util.tree_structure(loaded.params) == jax.tree_util.tree_structure(params)
    for x, y in zip(jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(params), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    nested = P.load_policy(tmp_path / "a.msgpack").params
    np.testing.assert_array_equal(nested["params"]["Dense_1"]["bias"], params["params"]["Dense_1"]["bias"])

    changed = jax.tree.map(lambda v: v, params)
    changed["params"]["Dense_1"]["bias"] = changed["params"]["Dense_1"]["bias"] + 1e-7
    P.save_policy(tmp_path / "a.msgpack", changed, META)  # replaces the file atomically
    assert (tmp_path / "a.msgpack").read_bytes() != (tmp_path / "b.msgpack").read_bytes()


@pytest.fixture
def policy_file(tmp_path):
    path = tmp_path / "policy.msgpack"
    P.save_policy(path, init_state(0).params, META)
    return path


def test_truncated_export(policy_file):
    data = policy_file.read_bytes()
    policy_file.write_bytes(data[:-10])
    with pytest.raises(
        P.PolicyFileError, match=rf"policy file {policy_file}: body is \d+ bytes, header says \d+: truncated"
    ):
        P.load_policy(policy_file)
    policy_file.write_bytes(data[:20])
    with pytest.raises(P.PolicyFileError, match=rf"policy file {policy_file}: 20 bytes, shorter than"):
        P.load_policy(policy_file)


def test_corrupt_export(policy_file):
    data = bytearray(policy_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    policy_file.write_bytes(bytes(data))
    with pytest.raises(P.PolicyFileError, match=rf"policy file {policy_file}: sha256 .* corrupt"):
        P.load_policy(policy_file)


def test_not_a_policy_or_other_version(policy_file):
    data = policy_file.read_bytes()
    policy_file.write_bytes(b"\x80\x04pickle" + data[14:])
    with pytest.raises(P.PolicyFileError, match=rf"policy file {policy_file}: bad magic"):
        P.load_policy(policy_file)
    policy_file.write_bytes(data[:8] + (2).to_bytes(4, "little") + data[12:])
    with pytest.raises(P.PolicyFileError, match=r"format version 2 != supported 1"):
        P.load_policy(policy_file)


def test_export_template_and_metadata_mismatch(policy_file):
    with pytest.raises(
        P.PolicyFileError,
        match=rf"policy file {policy_file} does not match the template params: "
        r"params/Dense_0/kernel: file float32\[8, 1\] != template float32\[16, 1\]",
    ):
        P.load_policy(policy_file, template=init_state(0, hidden=16).params)
    with pytest.raises(P.PolicyFileError, match=r"metadata 'action_dim' is 1, expected 2"):
        P.load_policy(policy_file, expected_metadata={"action_dim": 2})
    with pytest.raises(P.PolicyFileError, match=r"metadata has no 'ensemble'"):
        P.load_policy(policy_file, expected_metadata={"ensemble": 2})


def test_export_rejects_what_it_cannot_store_exactly(tmp_path):
    with pytest.raises(TypeError, match="PRNG key"):
        P.save_policy(tmp_path / "p", {"k": jax.random.key(0)}, META)
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        P.save_policy(tmp_path / "p", {"w": np.zeros(2)}, {"when": object()})
    with pytest.raises(ValueError, match="Out of range float values"):
        P.save_policy(tmp_path / "p", {"w": np.zeros(2)}, {"x": float("nan")})
    assert os.listdir(tmp_path) == []
