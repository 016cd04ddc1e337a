"""Compose methods in one wrap: visual-token pruning with a hallucination-mitigating decoding method.

``vtc.wrap(model, ["dart.r64", "deco"])`` runs DART's pruning in the prefill and DeCo's decoding
(it corrects each step's logits with an earlier layer's) through stock ``generate``. Pruning stages
chain in layer order; two decoding methods, or two pre-passes, are refused when wrapping with a
``MethodConflictError``, as the end of this script shows. Runs on the reference LLaVA shipped with vtc.

    python examples/compose.py
    python examples/compose.py --methods sparsevlm.r64,dropout_decoding
"""

import argparse

import torch

import vtc
from vtc.eval import shapesqa
from vtc.reference import model as reference

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--methods", default="dart.r64,deco", help="comma-separated specs, run together")
args = parser.parse_args()

model, processor = reference.load()
scene, example = shapesqa.sample_example(3, "describe")
inputs = processor(images=[shapesqa.render(scene)], text=[reference.prompt(example.question)], return_tensors="pt")
print(f"Q: {example.question}  (reference: {example.answer})")

for specs in (["dense"], args.methods.split(",")):
    handle = None if specs == ["dense"] else vtc.wrap(model, specs)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    text = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    print(f"\n{' + '.join(specs)}: {text}")
    if handle is not None:
        print(handle.stats)
        handle.remove()

try:
    vtc.wrap(model, ["deco", "dropout_decoding"])
except vtc.MethodConflictError as err:
    print(f"\nrefused as expected: {err}")
