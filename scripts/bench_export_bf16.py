"""What a bf16 export rounds away of a trained SVD delta (docs/export.md), one JSON line per case.

    python scripts/bench_export_bf16.py --out docs/results/export_bf16.jsonl

W ~ N(0, 0.02^2) (Qwen3's init std) of size 64 x 64 (the tiny model's d) and 2560 x 2560 (Qwen3-4B's
d); delta_s ~ N(0, sigma^2) with sigma = lr * steps of the presets (an upper bound on the drift of an
Adam-trained delta_s: smoke 1e-3 x 4, fast 7e-5 x 20, full 7e-5 x 200). The merged weight
W + U diag(delta) Vh is formed in fp32 and cast once to bf16 (`models.export.bf16_rounding`); the
delta that survives is bf16(W') - bf16(W). Also: the fp32 gap between U diag(S + delta) Vh and
W + U diag(delta) Vh (the SVD's reconstruction error, which the additive form avoids).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from jaxhack.models.export import bf16_rounding  # noqa: E402

PRESET_SIGMA = {"smoke": 1e-3 * 4, "fast": 7e-5 * 20, "full": 7e-5 * 200}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,2560", help="comma-separated square matrix sizes")
    ap.add_argument("--out", type=Path, default=None, help="JSON lines file (default: stdout only)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        sizes = [int(x) for x in args.sizes.split(",")]
    except ValueError:
        ap.error(f"--sizes {args.sizes!r}: expected comma-separated integers")
    if min(sizes) < 1 or args.seed < 0:
        ap.error(f"--sizes {args.sizes!r} / --seed {args.seed}: expected sizes >= 1 and a seed >= 0")
    rng = np.random.default_rng(args.seed)
    lines = []
    for n in sizes:
        w = (0.02 * rng.standard_normal((n, n))).astype(np.float32)
        t0 = time.time()
        u, s, vh = np.linalg.svd(w)  # fp32
        t_svd = time.time() - t0
        for preset, sigma in PRESET_SIGMA.items():
            delta = (sigma * rng.standard_normal(n)).astype(np.float32)
            dw = (u * delta) @ vh
            via_s = (u * (s + delta)) @ vh
            rec = {"size": n, "preset_sigma": preset, "sigma": sigma, "w_std": 0.02,
                   "s_median": float(np.median(s)), "s_max": float(s.max()), **bf16_rounding(w, u, s, vh, delta),
                   "fp32_svd_form_vs_additive_rel": float(np.linalg.norm(via_s - (w + dw)) / np.linalg.norm(dw)),
                   "svd_s": round(t_svd, 2)}
            lines.append(json.dumps(rec, sort_keys=True))
            print(lines[-1], flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
