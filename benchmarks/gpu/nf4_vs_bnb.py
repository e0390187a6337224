"""lmzoo NF4 vs bitsandbytes, bit for bit, on a CUDA GPU (prints one JSON line; exit 1 when they differ).

    pip install bitsandbytes   # on the GPU machine
    python benchmarks/gpu/nf4_vs_bnb.py [--rows 1024 --cols 768 --seed 0]

Quantizes one normal weight with both (block 64, no double quantization) in float32, bfloat16 and
float16, and compares the packed 4-bit indices, the block scales, and the dequantized weights
(:func:`lmzoo.quant.nf4.compare_with_bitsandbytes`). Without CUDA or bitsandbytes it prints
``{"skipped": reason}`` and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys

from lmzoo.quant.nf4 import compare_with_bitsandbytes


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=768)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    try:
        res = compare_with_bitsandbytes(a.rows, a.cols, a.seed)
    except RuntimeError as e:
        print(json.dumps({"benchmark": "nf4_vs_bnb", "skipped": str(e)}))
        return 0
    print(json.dumps({"benchmark": "nf4_vs_bnb", **res}))
    return 0 if res["all_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
