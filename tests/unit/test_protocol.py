"""Wire format v1: what decode accepts, and one test per reject reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
from agent_proc import make_frames, with_header

from agent import protocol
from agent.protocol import REJECT_REASONS, Layout, ProtocolError, decode, layout_id

MAX = 1 << 20


def good(**kw) -> list[bytes]:
    kw.setdefault("scalars", {"loss": 2.5, "lr": 1e-3})
    kw.setdefault("stats", ("grad_l2", "param_l2"))
    kw.setdefault("tensors", ("w1", "w2", "w3"))
    kw.setdefault("matrix", np.arange(6).reshape(3, 2))
    return make_frames(**kw)


def reason_of(frames: list[bytes], layouts: dict | None = None, max_bytes: int = MAX) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(frames, {} if layouts is None else layouts, max_bytes=max_bytes)
    assert info.value.reason in REJECT_REASONS
    return info.value.reason


def test_decode_round_trip():
    frames = good(run="r1", rank=3, step=41, sent=40, dropped=2, seq=7, time_=123.5)
    msg = decode(frames, {}, max_bytes=MAX)
    assert (msg.run, msg.rank, msg.step, msg.seq, msg.sent, msg.dropped, msg.time) == (
        "r1",
        3,
        41,
        7,
        40,
        2,
        123.5,
    )
    assert msg.layout == Layout(("loss", "lr"), ("grad_l2", "param_l2"), ("w1", "w2", "w3"))
    assert msg.scalar("loss") == 2.5
    assert msg.scalar("missing") is None
    np.testing.assert_array_equal(msg.matrix, np.arange(6, dtype=np.float32).reshape(3, 2))


def test_nan_and_inf_are_decoded_not_rejected():
    msg = decode(good(scalars={"loss": np.nan}, matrix=[[np.inf, 1], [2, -np.inf], [3, 4]]), {}, max_bytes=MAX)
    assert np.isnan(msg.scalar("loss"))
    assert np.isposinf(msg.matrix[0, 0]) and np.isneginf(msg.matrix[1, 1])


@pytest.mark.parametrize("count", [1, 2, 4])
def test_frame_count(count):
    frames = good()
    frames = (frames + [b"extra"])[:count]
    assert reason_of(frames) == "frame_count"


@pytest.mark.parametrize("header", [b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'"text"', b""])
def test_malformed_header(header):
    assert reason_of([header, *good()[1:]]) == "malformed_header"


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_unsupported_version(version):
    assert reason_of(with_header(good(), v=version)) == "unsupported_version"


@pytest.mark.parametrize(
    "changes",
    [
        {"kind": "command"},
        {"run": ""},
        {"run": "x" * (protocol.MAX_RUN_NAME + 1)},
        {"run": 5},
        {"rank": -1},
        {"rank": True},
        {"step": 1.5},
        {"step": None},
        {"sent": "3"},
        {"time": "now"},
        {"layout": 17},
    ],
)
def test_bad_field(changes):
    assert reason_of(with_header(good(), **changes)) == "bad_field"


@pytest.mark.parametrize("t", [float("nan"), float("inf")])
def test_nonfinite_time_is_bad_field(t):
    assert reason_of(with_header(good(), time=t)) == "bad_field"


@pytest.mark.parametrize(
    "layout",
    [
        b"{",
        b"[]",
        b'{"scalars": [], "stats": []}',
        b'{"scalars": [1], "stats": [], "tensors": []}',
        b'{"scalars": [""], "stats": [], "tensors": []}',
        b'{"scalars": 5, "stats": [], "tensors": []}',
    ],
)
def test_malformed_layout(layout):
    frames = with_header(good(), layout=layout_id(layout))
    assert reason_of([frames[0], layout, frames[2]]) == "malformed_layout"


def test_layout_mismatch():
    frames = good()
    other = Layout(("x",), (), ()).encode()
    assert reason_of([frames[0], other, frames[2]]) == "layout_mismatch"


@pytest.mark.parametrize("delta", [-4, -1, 4])
def test_size_mismatch(delta):
    frames = good()
    data = frames[2][:delta] if delta < 0 else frames[2] + b"\0" * delta
    assert reason_of([frames[0], frames[1], data]) == "size_mismatch"


def test_oversized_counts_all_frames():
    frames = good()
    total = sum(map(len, frames))
    decode(frames, {}, max_bytes=total)
    assert reason_of(frames, max_bytes=total - 1) == "oversized"


def test_every_reason_is_covered_by_a_test_above():
    covered = {
        "frame_count",
        "malformed_header",
        "unsupported_version",
        "bad_field",
        "malformed_layout",
        "layout_mismatch",
        "size_mismatch",
        "oversized",
    }
    assert covered == set(REJECT_REASONS)


def test_protocol_error_refuses_unknown_reason():
    with pytest.raises(ValueError, match="unknown reject reason"):
        ProtocolError("no_such_reason", "x")


def test_layout_cache_is_used_after_first_decode():
    frames = good()
    layouts: dict = {}
    decode(frames, layouts, max_bytes=MAX)
    assert list(layouts) == [json.loads(frames[0])["layout"]]
    msg = decode([frames[0], b"not even json", frames[2]], layouts, max_bytes=MAX)
    assert msg.layout.tensors == ("w1", "w2", "w3")


def test_layout_cache_is_bounded_oldest_first():
    layouts: dict = {}
    ids = []
    for i in range(10):
        frames = make_frames(scalars={f"s{i}": 1.0})
        ids.append(json.loads(frames[0])["layout"])
        decode(frames, layouts, max_bytes=MAX, max_layouts=4)
        assert len(layouts) <= 4
    assert list(layouts) == ids[-4:]


# Found while writing the agent; the agent guards against each (see agent/receive.py).


def test_deeply_nested_header_is_a_protocol_error():
    reason_of([b"[" * 100_000 + b"]" * 100_000, *good()[1:]])


def test_boolean_version_is_rejected():
    assert reason_of(with_header(good(), v=True)) == "unsupported_version"


def test_layout_names_must_be_a_list():
    layout = b'{"scalars": "abc", "stats": [], "tensors": []}'
    frames = with_header(make_frames(scalars={"a": 1, "b": 2, "c": 3}), layout=layout_id(layout))
    assert reason_of([frames[0], layout, frames[2]]) == "malformed_layout"


# Roles: an optional layout field, parallel to tensors (docs/protocol.md, "Frame 2: layout").

ROLED = Layout(("loss",), ("grad_l2",), ("h.0.attn.qkv.weight", "h.0.ln1.weight", "h.0.ln1.bias"), ("qkv", "norm", ""))


def _frames_for(layout: Layout) -> list[bytes]:
    frames = good(scalars={n: 1.0 for n in layout.scalars}, stats=layout.stats, tensors=layout.tensors,
                  matrix=np.zeros((len(layout.tensors), len(layout.stats))))  # fmt: skip
    raw = layout.encode()
    return [with_header(frames, layout=layout_id(raw))[0], raw, frames[2]]


def test_layout_roles_round_trip():
    msg = decode(_frames_for(ROLED), {}, max_bytes=MAX)
    assert msg.layout == ROLED and msg.layout.roles == ("qkv", "norm", "")
    assert json.loads(ROLED.encode())["roles"] == ["qkv", "norm", ""]


def test_layout_without_roles_keeps_its_bytes_and_id():
    plain = Layout(ROLED.scalars, ROLED.stats, ROLED.tensors)
    raw = b'{"scalars":["loss"],"stats":["grad_l2"],"tensors":["h.0.attn.qkv.weight","h.0.ln1.weight","h.0.ln1.bias"]}'
    assert plain.encode() == raw and layout_id(plain.encode()) == layout_id(raw)
    assert decode(_frames_for(plain), {}, max_bytes=MAX).layout.roles == ()
    assert plain != ROLED and hash(plain) != hash(ROLED) and layout_id(ROLED.encode()) != layout_id(raw)


def test_layout_roles_survive_pickling():
    import pickle

    back = pickle.loads(pickle.dumps(ROLED))
    assert back == ROLED and back.roles == ROLED.roles and hash(back) == hash(ROLED)


def test_layout_refuses_roles_not_parallel_to_tensors():
    with pytest.raises(ValueError, match="roles"):
        Layout((), ("grad_l2",), ("a", "b"), ("qkv",))


@pytest.mark.parametrize(
    "roles",
    [
        "qkv",  # not a list
        ["qkv", "norm"],  # fewer than tensors
        [],  # present but empty while there are tensors
        ["qkv", "norm", "bias", "extra"],
        ["qkv", 3, "bias"],
        ["qkv", None, "bias"],
        ["qkv", "x" * (protocol.MAX_ROLE + 1), "bias"],
        ["qkv", "\ud800", "bias"],  # a lone surrogate: not UTF-8
    ],
)
def test_malformed_roles_are_rejected(roles):
    obj = json.loads(ROLED.encode())
    obj["roles"] = roles
    raw = json.dumps(obj).encode()
    frames = _frames_for(ROLED)
    assert reason_of([with_header(frames, layout=layout_id(raw))[0], raw, frames[2]]) == "malformed_layout"


def test_unknown_layout_keys_are_ignored():
    """What lets an old agent read a layout with roles: keys it does not know are skipped."""
    obj = {**json.loads(ROLED.encode()), "future": {"x": 1}}
    raw = json.dumps(obj).encode()
    frames = _frames_for(ROLED)
    msg = decode([with_header(frames, layout=layout_id(raw))[0], raw, frames[2]], {}, max_bytes=MAX)
    assert msg.layout == ROLED
