"""The metric writer: JSONL keeps names and values; TensorBoard event files get legal tags."""

from __future__ import annotations

import json

from gte_jax.metrics import MetricWriter


def test_jsonl_and_tensorboard(tmp_path):
    w = MetricWriter(tmp_path)
    w.write(3, {"loss": 0.5, "bible/ndcg@10": 0.9, "text": "not a number"}, prefix="eval/")
    w.write(4, {"loss": float("nan")})
    w.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 3, "eval/loss": 0.5, "eval/bible/ndcg@10": 0.9}
    assert rows[1] == {"step": 4, "loss": "nan"}
    scalars = _read_events(tmp_path)
    assert {("eval/loss", 3), ("eval/bible/ndcg_at_10", 3), ("loss", 4)} <= set(scalars)
    assert abs(scalars[("eval/bible/ndcg_at_10", 3)] - 0.9) < 1e-6


def _read_events(logdir):
    """Scalars of TFRecord-framed event files (u64 length, u32 crc, payload, u32 crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = {}
    for path in logdir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 16 + length
            for v in event.summary.value:
                out[(v.tag, event.step)] = v.simple_value
    return out


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricWriter(tmp_path / "off", enabled=False)
    w.write(1, {"loss": 1.0})
    w.close()
    assert not (tmp_path / "off").exists()
