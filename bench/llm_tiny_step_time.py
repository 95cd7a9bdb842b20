"""Where the first run's fine-tuning time goes: one optimiser step of the tiny Llama by batch size and threads.

    python bench/llm_tiny_step_time.py [--length 50] [--answer 12] [--batch-sizes 8 16 32 64] [--threads 1 2] \\
        [--compile]

The default ``tiny`` backbone (TinyBackboneConfig: width 128, 4 layers) with
the first run's vocabulary (3,000 BPE tokens plus 1,028 code tokens), a
random batch of ``--length`` tokens whose last ``--answer`` positions are
scored (as the training collator keeps only the answer's logits), AdamW and
gradient clipping as the Trainer runs them (fused AdamW, its default).
``--compile`` adds the same steps through ``torch.compile`` and records the
first step's seconds (the compilation). Time it with nothing else running.
Writes bench/results/llm_synthetic_tiny_step_time.json (and .md), keyed
``synthetic``: milliseconds per step and tokens per second per (compiled,
threads, batch).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402

from kgtok.llm.config import TinyBackboneConfig  # noqa: E402

FIRST_RUN_VOCABULARY = 3000 + 1028  # BPE tokens plus the first run's code tokens (finetune/metrics.json)


def step_seconds(threads: int, batch: int, length: int, answer: int, repeats: int = 30,
                 compiled: bool = False) -> tuple[float, float]:
    """Mean seconds of one forward, backward, clip and AdamW step after 5 warm-up steps, and the seconds of the
    first step (with ``compiled``: torch.compile's inductor, dynamic shapes, compiling there)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    tiny = TinyBackboneConfig()
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=FIRST_RUN_VOCABULARY, hidden_size=tiny.hidden_size, num_hidden_layers=tiny.layers,
        num_attention_heads=tiny.heads, num_key_value_heads=tiny.heads, intermediate_size=tiny.intermediate_size,
        max_position_embeddings=tiny.max_position_embeddings, tie_word_embeddings=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # the Trainer's default from torch 2.8
    ids = torch.randint(0, FIRST_RUN_VOCABULARY, (batch, length))
    forward = torch.compile(model, dynamic=True) if compiled else model

    def step() -> None:
        logits = forward(input_ids=ids, logits_to_keep=answer).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 ids[:, -answer:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(4):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=50, help="tokens per example (the first run's are ~50)")
    parser.add_argument("--answer", type=int, default=12, help="scored positions per example")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd steps (same run)")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    rows = []
    for compiled in (False, True) if args.compile else (False,):
        for threads in args.threads:
            for batch in args.batch_sizes:
                seconds, first = step_seconds(threads, batch, args.length, args.answer, compiled=compiled)
                rows.append({"compiled": compiled, "threads": threads, "batch": batch,
                             "ms_per_step": round(1000 * seconds, 1),
                             "tokens_per_second": round(batch * args.length / seconds),
                             "first_step_seconds": round(first, 1)})
                print(rows[-1], flush=True)
    table = " ".join(f"{'compiled-' if r['compiled'] else ''}t{r['threads']}b{r['batch']}={r['ms_per_step']}ms/"
                     f"{r['tokens_per_second']}tok/s" for r in rows)
    write_result("llm_synthetic_tiny_step_time", "synthetic",
                 {"length": args.length, "answer": args.answer, "rows": rows, "steps": table, "note": args.note,
                  "command": command(), "machine": machine()}, ["length", "answer", "steps"])


if __name__ == "__main__":
    main()
