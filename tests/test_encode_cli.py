"""`gte-jax encode` end to end through the dispatcher, on a tiny exported model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from gte_jax import cli
from gte_jax.encode import Embedder, bucket_length
from gte_jax.hf import export_pretrained, load_tokenizer
from gte_jax.models import BiEncoder, EncoderConfig

TEXTS = [
    "first line",
    "",
    "a somewhat longer second line with more tokens in it",
    "ünïcödé 東京 🎉",
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, minilm_dir):
    """A random one-layer BERT with MiniLM's tokenizer, exported like a trained model."""
    tokenizer = load_tokenizer(minilm_dir)
    config = EncoderConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    model = BiEncoder(config, pooling="mean", normalize=True, rngs=nnx.Rngs(0))
    return export_pretrained(model, tokenizer, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    return Embedder.from_pretrained(tiny_model_dir).encode(TEXTS, batch_size=2)


def test_bucket_lengths_are_few_and_capped():
    assert [bucket_length(n, 512) for n in (1, 16, 17, 64, 65, 256, 257)] == [
        16,
        16,
        32,
        64,
        96,
        256,
        320,
    ]
    assert bucket_length(300, 256) == 256
    assert len({bucket_length(n, 256) for n in range(1, 257)}) == 10


def _argv(model, source, output) -> list[str]:
    return ["encode", "--model", str(model), "--input", str(source), "--output", str(output)]


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_encode_writes_the_embedder_output(tiny_model_dir, expected, tmp_path, kind):
    source = tmp_path / f"texts.{kind}"
    if kind == "txt":
        source.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    else:
        lines = [json.dumps({"text": t, "id": i}, ensure_ascii=False) for i, t in enumerate(TEXTS)]
        source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output = tmp_path / "out.npy"
    argv = _argv(tiny_model_dir, source, output)
    assert cli.main(argv + ["--batch-size", "2"]) == 0
    got = np.load(output)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_encode_options_reach_the_embedder(tiny_model_dir, tmp_path):
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    output = tmp_path / "out.npy"
    argv = _argv(tiny_model_dir, source, output)
    options = ["--prefix", "query: ", "--pooling", "cls", "--no-normalize", "--max-length", "8"]
    assert cli.main(argv + options) == 0
    embedder = Embedder.from_pretrained(tiny_model_dir)
    want = embedder.encode(TEXTS, max_length=8, prefix="query: ", pooling="cls", normalize=False)
    np.testing.assert_allclose(np.load(output), want, atol=1e-6)
    assert not np.allclose(np.linalg.norm(want, axis=1), 1.0)


def test_encode_reports_its_compiled_shapes_and_pads_on_request(
    tiny_model_dir, expected, tmp_path, capsys
):
    """Packed by default (one shape for the call, reported); --no-packing: padded buckets, the
    same embeddings."""
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    output = tmp_path / "out.npy"
    argv = _argv(tiny_model_dir, source, output) + ["--batch-size", "2"]
    assert cli.main(argv) == 0
    assert "(1 batch shape(s) compiled: " in capsys.readouterr().err
    assert cli.main(argv + ["--no-packing"]) == 0
    assert "padded rows x length" in capsys.readouterr().err
    np.testing.assert_allclose(np.load(output), expected, atol=1e-5)


@pytest.mark.parametrize(
    "line,message",
    [
        (
            '{"text": "ok"',
            "malformed JSON (expecting ',' delimiter at column 14; "
            "the line ends before the JSON object does).",
        ),
        ('{"title": "no text"}', 'missing field "text"'),
        ('{"text": 3}', 'field "text" has type int'),
        ('["text"]', "expected a JSON object"),
    ],
)
def test_bad_jsonl_line_is_named(tiny_model_dir, tmp_path, capsys, line, message):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "fine"}\n{"text": "also fine"}\n' + line + "\n", encoding="utf-8")
    output = tmp_path / "out.npy"
    argv = _argv(tiny_model_dir, source, output)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{source}:3:" in err and message in err
    assert not output.exists()


def test_unsupported_input_type_exits_2(tiny_model_dir, tmp_path, capsys):
    source = tmp_path / "texts.csv"
    source.write_text("a,b\n")
    argv = [
        "encode",
        "--model",
        str(tiny_model_dir),
        "--input",
        str(source),
        "--output",
        str(tmp_path / "o.npy"),
    ]
    assert cli.main(argv) == 2
    assert ".txt or .jsonl" in capsys.readouterr().err
