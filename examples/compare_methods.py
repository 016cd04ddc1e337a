"""Compare pruning methods on one image: answers, visual tokens kept, prefill FLOPs, kept patches drawn.

Runs the reference LLaVA shipped with vtc dense and with each method at one budget, prints a table,
and writes one PNG per method with the patches it dropped greyed out. Without ``--image`` the image
and question are a held-out ShapesQA example; the reference model only knows ShapesQA's words, so
ask your own image a ShapesQA-style question (``is there a red circle in the image ?``).

    python examples/compare_methods.py
    python examples/compare_methods.py --image photo.png --question "how many shapes are there ?" --keep 16
"""

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageOps

import vtc
from vtc.eval import shapesqa
from vtc.eval.report import plot_kept_patches
from vtc.reference import model as reference

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--image", type=Path, help="an image file (default: a ShapesQA scene)")
parser.add_argument("--question", help="the question (default: the ShapesQA example's)")
parser.add_argument("--methods", default="dart,sparsevlm,focusllava,gemfilter,random")
parser.add_argument("--keep", type=int, default=32, help="visual tokens to keep, of the model's 144")
parser.add_argument("--out", type=Path, default=Path("kept_patches"), help="folder for the PNGs")
args = parser.parse_args()

row, scene = next(shapesqa.split_rows("test", 1))
image = Image.open(args.image).convert("RGB") if args.image else shapesqa.render(scene)
model, processor = reference.load()
question = args.question or row["question"]
inputs = processor(images=[image], text=[reference.prompt(question)], return_tensors="pt")
side = reference.IMAGE_SIZE // reference.PATCH  # the 12 x 12 patch grid
shown = ImageOps.fit(image, (384, 384), Image.NEAREST)  # the centre square the model sees, enlarged
print(f"question: {question}" + ("" if args.image or args.question else f"  (answer: {row['answer']})"))


def answer() -> str:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


n_visual = model.config.image_seq_length
print(f"{'method':<12} {'visual kept':>11} {'layer avg':>9} {'prefill FLOPs':>13}  answer")
print(f"{'dense':<12} {n_visual:>11} {n_visual:>9.1f} {1:>13.1%}  {answer()}")
for name in args.methods.split(","):
    # sparsevlm takes a ratio instead of a count: keep the same number of tokens either way
    fields = vtc.resolve(name).to_dict()
    budget = {"keep": args.keep} if "keep" in fields else {"keep_ratio": args.keep / n_visual}
    with vtc.apply(model, name, **budget) as handle:
        text = answer()
        stats = handle.stats
    last, average = stats.visual_per_layer[-1][0], stats.layer_averaged_visual()[0]  # entering the last layer
    print(f"{name:<12} {last:>11} {average:>9.1f} {stats.flops.prefill_ratio:>13.1%}  {text}")
    plot_kept_patches(shown, stats.kept_visual()[0].tolist(), (side, side), args.out / f"{name}.png")
print(f"kept patches drawn in {args.out}/ (one PNG per method; dropped patches greyed out)")
