"""Wrap a model with one call, generate as usual, read the statistics, unwrap.

Part 1 loads the reference LLaVA that ships with vtc (no download), wraps it with a pruning method and
answers two ShapesQA questions in one left-padded batch with stock ``generate``. Part 2 makes the same
call on a tiny random Qwen2-VL built from a config (the one vtc's tests use), to show that nothing in
the call is LLaVA-specific; its answers are random token ids.

    python examples/wrap_and_generate.py
    python examples/wrap_and_generate.py --method sparsevlm --keep 24
"""

import argparse

import torch

import vtc
from vtc.adapters.qwen2_vl import Qwen2VLAdapter
from vtc.eval import shapesqa
from vtc.reference import model as reference

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--method", default="dart", help="a method name, e.g. dart, sparsevlm, random")
parser.add_argument("--keep", type=int, default=32, help="visual tokens to keep (the reference model has 144)")
args = parser.parse_args()

# -- part 1: the reference LLaVA, a batch of two prompts of different lengths -----------------------
model, processor = reference.load()  # the tokenizer pads on the left, as batched generation needs
examples = [shapesqa.sample_example(1, "count"), shapesqa.sample_example(7, "position")]  # (scene, question)
images = [shapesqa.render(scene) for scene, _ in examples]
questions = [q for _, q in examples]
prompts = [reference.prompt(q.question) for q in questions]
inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)

handle = vtc.wrap(model, args.method, keep=args.keep)  # in place; stock forward and generate now prune
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
for q, answer in zip(questions, answers, strict=True):
    print(f"Q: {q.question}  A: {answer.strip()}  (expected: {q.answer})")
print(handle)
print(handle.stats)
handle.remove()  # the model is exactly as it was before wrap
print("after remove:", handle)

# -- part 2: the same call on a tiny random Qwen2-VL ------------------------------------------------
qwen = Qwen2VLAdapter.tiny_model()
samples = Qwen2VLAdapter.make_samples(qwen, batch=2)  # two rows of different lengths, one random image each
batch = Qwen2VLAdapter.collate(qwen, samples)  # left-padded ids, the images' patches and grids
with vtc.apply(qwen, args.method, keep=args.keep) as qwen_handle, torch.no_grad():
    out = qwen.generate(**batch, max_new_tokens=4, do_sample=False)
    print("Qwen2-VL new token ids:", out[:, batch["input_ids"].shape[1] :].tolist())
    print(qwen_handle.stats)
