"""The cost of running the Q-Former, its query tokens and the projection in float32 instead of bfloat16,
at the published size (BERT-base Q-Former reading 257 ViT-g tokens, 32 queries, projection to 2560).

Random weights, one image at a time, the two precisions alternated (A B A B) so that host drift
cancels; prints the paired ratios (float32 / bfloat16) with their spread, and the extra memory.
    .venv/bin/python scripts/measure_qformer.py [--rounds 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = Blip2QFormerConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                intermediate_size=3072, cross_attention_frequency=2, encoder_hidden_size=1408)
    sides = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        qformer = Blip2QFormerModel(config).eval().to(dtype)
        queries = torch.randn(1, 32, 768, dtype=dtype)
        projection = torch.nn.Linear(768, 2560).to(dtype)
        sides[dtype] = (qformer, queries, projection)
    image = torch.randn(1, 257, 1408, dtype=torch.bfloat16)
    mask = torch.ones(1, 257, dtype=torch.long)

    def once(dtype: torch.dtype) -> float:
        qformer, queries, projection = sides[dtype]
        start = time.perf_counter()
        with torch.inference_mode():
            out = qformer(query_embeds=queries, encoder_hidden_states=image.to(dtype),
                          encoder_attention_mask=mask).last_hidden_state
            projection(out).to(torch.bfloat16)
        return time.perf_counter() - start

    for dtype in sides:  # warm-up
        once(dtype), once(dtype)
    ratios, f32, b16 = [], [], []
    for _ in range(args.rounds):
        a, b = once(torch.float32), once(torch.bfloat16)
        f32.append(a), b16.append(b), ratios.append(a / b)
    params = sum(p.numel() for p in sides[torch.float32][0].parameters()) + 768 * 2560 + 32 * 768
    print(f"Q-Former + projection: {params / 1e6:.0f} M parameters; float32 takes {params * 2 / 1e6:.0f} MB more")
    print(f"float32  per image: median {statistics.median(f32) * 1000:.0f} ms (min {min(f32) * 1000:.0f}, "
          f"max {max(f32) * 1000:.0f})")
    print(f"bfloat16 per image: median {statistics.median(b16) * 1000:.0f} ms (min {min(b16) * 1000:.0f}, "
          f"max {max(b16) * 1000:.0f})")
    print(f"paired ratio float32/bfloat16 over {args.rounds} rounds: median {statistics.median(ratios):.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
