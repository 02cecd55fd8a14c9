"""sentence-transformers' own fine-tune, as a user runs it: the peer process of
``train_vs_st.py --whole-process``. MultipleNegativesRankingLoss (scale = 1 / temperature), AdamW,
linear warmup + decay, CPU; the model is saved at the end. Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import time


def training_args(
    output_dir: str,
    *,
    batch_size: int,
    learning_rate: float,
    seed: int,
    bf16: bool = False,
    **steps,
):
    """sentence-transformers' trainer settings both benchmarks use: AdamW (weight decay 0.01, eps
    1e-6), linear schedule, clipping 1.0, CPU, no evaluation, saving or logging in between.
    ``steps``: ``max_steps`` / ``warmup_steps`` or ``num_train_epochs`` / ``warmup_ratio``."""
    from sentence_transformers import SentenceTransformerTrainingArguments

    return SentenceTransformerTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="linear",
        weight_decay=0.01,
        adam_epsilon=1e-6,
        max_grad_norm=1.0,
        seed=seed,
        use_cpu=True,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        bf16=bf16,  # torch.autocast(cpu, bfloat16) around the forward (HF Trainer's mixed precision)
        **steps,
    )


def main() -> None:
    t_start = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--train_file", required=True, help="JSONL with query / positive")
    p.add_argument("--out", required=True)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--learning_rate", type=float, default=2e-5)
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="the trainer's bf16 mixed precision")
    args = p.parse_args()

    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    queries, docs = [], []
    with open(args.train_file, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                queries.append(rec["query"])
                docs.append(rec["positive"])
    torch.manual_seed(args.seed)
    model = SentenceTransformer(args.model, device="cpu")
    model.max_seq_length = args.max_length
    targs = training_args(
        args.out + "_run",
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        num_train_epochs=args.epochs,
        warmup_ratio=args.warmup_ratio,
        bf16=args.bf16,
    )
    dataset = Dataset.from_dict({"anchor": queries, "positive": docs})
    trainer = SentenceTransformerTrainer(
        model=model,
        args=targs,
        train_dataset=dataset,
        loss=MultipleNegativesRankingLoss(model, scale=1.0 / args.temperature),
    )
    t0 = time.perf_counter()
    out = trainer.train()
    train_seconds = time.perf_counter() - t0
    model.save(args.out)
    print(
        json.dumps(
            {
                "examples": len(queries) * args.epochs,
                "steps": int(out.global_step),
                "train_seconds": round(train_seconds, 2),
                "process_seconds": round(time.perf_counter() - t_start, 2),
                "mean_train_loss": round(float(out.training_loss), 4),
                "bf16": args.bf16,
            }
        )
    )


if __name__ == "__main__":
    main()
