"""FLOPs of a known checkpoint under several methods, by name: nothing is downloaded or loaded.

``vtc.flops(name, spec)`` applies the papers' per-layer formula (4nd² + 2n²d + 3ndm) to the published
shapes of the checkpoint and to the token counts each method plans to keep; it is the Python side of
``vtc flops llava-1.5-7b --method dart.r64``. The ratio printed is the decoder layers' prefill FLOPs
relative to dense, the figure the papers report. Methods whose counts depend on the input (MustDrop's
thresholds, FocusLLaVA's vision-guided merges) have no planned figure: measure them on a wrapped model
with ``handle.stats.flops`` (see compare_methods.py).

    python examples/flops_by_name.py
    python examples/flops_by_name.py --model qwen2-vl-7b --visual-tokens 1024 --methods dart.r64,sparsevlm.r64
"""

import argparse

import vtc
from vtc.flops import KNOWN_DIMS

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="llava-1.5-7b", choices=sorted(KNOWN_DIMS))
parser.add_argument("--methods", default="dart.r192,dart.r128,dart.r64,sparsevlm.r64,gemfilter.r64,mustdrop.r64")
parser.add_argument("--visual-tokens", type=int, help="visual tokens of the input (Qwen: required)")
parser.add_argument("--text-tokens", type=int, default=64)
args = parser.parse_args()
if args.visual_tokens is None and KNOWN_DIMS[args.model].vision.tokens_per_image is None:
    parser.error(f"{args.model} has no fixed tokens per image (dynamic resolution): pass --visual-tokens N")

dense = vtc.flops(args.model, visual_tokens=args.visual_tokens, text_tokens=args.text_tokens)
print(f"{args.model}: {len(dense.per_layer)} decoder layers, {args.text_tokens} text tokens")
print(f"{'method':<16} {'prefill FLOPs':>13} {'vs dense':>9} {'total vs dense':>15}")
print(f"{'dense':<16} {dense.prefill:>13.4g} {dense.prefill_ratio:>9.1%} {1:>15.1%}")
for spec in args.methods.split(","):
    try:
        report = vtc.flops(args.model, spec, visual_tokens=args.visual_tokens, text_tokens=args.text_tokens)
    except ValueError as err:  # a data-dependent method: no count to plan from
        print(f"{spec:<16} {'-':>13} {'-':>9} {'-':>15}  ({err})")
        continue
    total = report.total / report.total_dense  # with the vision tower and the LM head
    print(f"{spec:<16} {report.prefill:>13.4g} {report.prefill_ratio:>9.1%} {total:>15.1%}")
