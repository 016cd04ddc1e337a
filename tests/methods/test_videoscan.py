"""VideoScan against references built here from the dense model's own embeddings and positions.

The reference of a scan is one forward of the unwrapped model over the sequence VideoScan feeds,
``[text, frame 1, carrier 1, frame 2, carrier 2, ..., text]`` (each carrier the mean of its frame's
embeddings at the floor of its frame's mean position), with an attention mask that hides each frame's
tokens from everything after its carrier. Tiny Qwen2-VL: a frame is one temporal patch of 64 tokens.
"""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, generate, text_inputs, tiny

import vtc
from vtc import surface
from vtc.adapters import ADAPTERS, adapter_for
from vtc.methods.videoscan import VideoScanConfig, most_similar_pair

FAMILY = "qwen2_vl"
PER_FRAME = ADAPTERS.get(FAMILY).VIDEO_GRID ** 2 // 4  # LLM tokens per temporal patch


def sample(frames: int, seed: int = 0) -> dict:
    return ADAPTERS.get(FAMILY).make_samples(tiny(FAMILY), batch=1, seed=seed, frames=[frames])[0]


def scan_sequence(model, one: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sequence a scan feeds for one unpadded sample: ``(embeds [L', d], positions [3, L'],
    frame [L'] (the frame of a frame token or carrier, -1 for text), carrier [L'] bool)``."""
    embeds, _ = text_inputs(model, one)
    embeds = embeds[0]
    positions = adapter_for(model).prompt_positions(one)[:, 0]  # [3, L]
    video = (one["input_ids"][0] == ADAPTERS.get(FAMILY).VIDEO_TOKEN).nonzero().flatten()
    out_e, out_p, frame, carrier = [], [], [], []
    number = 0
    for col in range(embeds.shape[0]):
        out_e.append(embeds[col])
        out_p.append(positions[:, col])
        is_video = bool((video == col).any())
        frame.append(number if is_video else -1)
        carrier.append(False)
        if is_video and (int((video < col).sum()) + 1) % PER_FRAME == 0:  # the frame's last token
            cols = video[number * PER_FRAME : (number + 1) * PER_FRAME]
            out_e.append(embeds[cols].float().mean(0).to(embeds.dtype))
            out_p.append(positions[:, cols].sum(-1) // len(cols))
            frame.append(number)
            carrier.append(True)
            number += 1
    return torch.stack(out_e), torch.stack(out_p, dim=1), torch.tensor(frame), torch.tensor(carrier)


class Visibility:
    """Eager attention under a given ``[L, L]`` visibility (True = may attend), for one unpadded row."""

    name = "vtc_test_videoscan_visibility"

    def __init__(self, allowed: torch.Tensor) -> None:
        self.allowed = allowed

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        floor = torch.finfo(query.dtype).min
        mask = torch.zeros(self.allowed.shape, dtype=query.dtype).masked_fill(~self.allowed, floor)
        return surface.attention_function("eager", module)(module, query, key, value, mask[None, None], **kwargs)


def reference(model, one: dict, hide_frames: bool, **kwargs):
    """One forward of the unwrapped model over the scan's sequence; frames hidden after their carriers."""
    embeds, positions, frame, carrier = scan_sequence(model, one)
    n = len(frame)
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    if hide_frames:  # a frame token is seen only by its own frame's tokens and carrier
        frame_token = (frame >= 0) & ~carrier
        allowed &= ~frame_token[None, :] | (frame[:, None] == frame[None, :])
    oracle = Visibility(allowed)
    surface.register_attention(oracle.name, oracle, masks_like="eager")
    config = model.config.text_config
    original = surface.attention_implementation(config)
    surface.set_attention_implementation(config, oracle.name)
    try:
        with torch.no_grad():
            out = model(inputs_embeds=embeds[None], position_ids=positions[:, None], use_cache=True, **kwargs)
    finally:
        surface.set_attention_implementation(config, original)
    return out, frame, carrier


@pytest.mark.parametrize("keep", [0, -1], ids=["carriers", "keep-all"])
def test_a_scan_equals_one_pass_with_each_frame_hidden_after_its_carrier(keep):
    """Carrier-only: the cache after the frames holds text and carriers, and every later token computes
    what it computes in one pass with the frame tokens hidden; keep-all equals the plain causal pass."""
    model = tiny(FAMILY)
    one = sample(8)
    expected, frame, carrier = reference(model, one, hide_frames=keep == 0)
    with vtc.apply(model, VideoScanConfig(keep=keep, memory=0)) as handle:
        stream = vtc.stream(handle)
        logits = stream.push(one)
        torch.testing.assert_close(logits[0], expected.logits[0, -1], atol=1e-4, rtol=1e-4)
        frames, text = int(carrier.sum()), int((frame < 0).sum())
        assert stream.stats.frames == [frames] == [4]
        held = text + frames if keep == 0 else len(frame)
        assert surface.layer_lengths(stream.cache) == [held] * adapter_for(model).num_layers
        assert stream.stats.carriers == [frames] and stream.stats.kept_tokens == [0 if keep == 0 else 4 * PER_FRAME]
        if keep == 0:  # the cached keys are the reference's at the text and carrier columns
            kept = (frame < 0) | carrier
            for j in range(adapter_for(model).num_layers):
                got = surface.layer_kv(stream.cache, j)[0]
                ref = surface.layer_kv(surface.output_cache(expected), j)[0][:, :, kept]
                torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_the_carrier_is_the_frame_mean_at_the_frame_mean_position():
    model = tiny(FAMILY)
    one = sample(4)
    embeds, positions, _, carrier = scan_sequence(model, one)
    seen = []

    def grab(module, args, kwargs):
        seen.append((kwargs["inputs_embeds"][0, -1], surface.position_rows(kwargs["position_ids"])[:, 0, -1]))

    with vtc.apply(model, "videoscan") as handle:
        hook = handle.adapter.text_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            vtc.stream(handle).push(one)
        finally:
            hook.remove()
    # one forward per frame, each ending with its carrier (text before a frame rides with it)
    assert len(seen) == 3
    for (e, p), at in zip(seen, carrier.nonzero().flatten(), strict=False):
        frame = embeds[at - PER_FRAME : at]
        assert torch.equal(e, frame.float().mean(0).to(e.dtype))
        assert torch.equal(p, positions[:, at])
        # the frame's time, and the centre of its 8 x 8 merged grid (rows and columns 0..7: floor(3.5))
        assert (p - positions[:, at - PER_FRAME : at].amin(-1)).tolist() == [0, 3, 3]


def test_plus_mode_keeps_each_layers_top_k_by_the_carriers_attention():
    model = tiny(FAMILY)
    one = sample(2)  # one frame
    k = 5
    expected, frame, carrier = reference(model, one, hide_frames=False, output_attentions=True)
    frame_cols = ((frame >= 0) & ~carrier).nonzero().flatten()
    start = int(frame_cols[0])
    with vtc.apply(model, VideoScanConfig(keep=k)) as handle:
        stream = vtc.stream(handle)
        stream.push(one)
        assert stream.stats.kept_tokens == [k]
        for j, attention in enumerate(expected.attentions):
            row = attention[0, :, int(carrier.nonzero()[0, 0]), frame_cols].float().mean(0)  # heads averaged
            top = row.topk(k).indices.sort().values + start
            got = surface.layer_kv(stream.cache, j)[0][:, :, start : start + k]
            ref = surface.layer_kv(surface.output_cache(expected), j)[0][:, :, top]
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        at = int(carrier.nonzero()[0, 0])
        layer_sets = {tuple(a[0, :, at, frame_cols].mean(0).topk(k).indices.tolist()) for a in expected.attentions}
        assert len(layer_sets) > 1, "the tiny model's layers should rank differently (else this proves little)"


def test_the_bank_drops_the_earlier_of_the_most_similar_adjacent_pair():
    a, b, c = torch.eye(3)
    carriers = torch.stack([a, b, b + 0.01 * c, c, c])
    assert most_similar_pair(carriers) == 3  # (c, c) is closer than (b, b + 0.01c); the earlier one goes
    assert most_similar_pair(torch.stack([a, a, b, b])) == 0  # ties: the first pair
    model = tiny(FAMILY)
    one = sample(12)  # six frames through a bank of three
    embeds, _, _, carrier = scan_sequence(model, one)
    bank = []
    for number, at in enumerate(carrier.nonzero().flatten().tolist()):
        bank.append((number, embeds[at].float()))
        if len(bank) > 3:
            bank.pop(most_similar_pair(torch.stack([e for _, e in bank])))
    with vtc.apply(model, VideoScanConfig(memory=3)) as handle:
        stream = vtc.stream(handle)
        stream.push(one)
        assert stream.bank == [[n for n, _ in bank]] and len(bank) == 3
        assert stream.stats.evicted == [3] and stream.stats.carriers == [3]


def test_memory_stays_flat_as_frames_grow():
    model = tiny(FAMILY)
    sizes = []
    with vtc.apply(model, VideoScanConfig(memory=1, keep=2)) as handle:
        for frames in (4, 8):  # the bank is full from the first frame on
            stream = vtc.stream(handle)
            stream.push(sample(frames))
            sizes.append((stream.stats.cache_bytes, stream.stats.peak_cache_bytes, stream.stats.cache_slots))
            assert stream.stats.frames == [frames // 2] and stream.stats.carriers == [1]
    assert sizes[0] == sizes[1]


def split_after_video(one: dict) -> tuple[dict, dict]:
    """(the prompt up to the video's end mark, with the pixels; the text after it)."""
    ids = one["input_ids"]
    end = int((ids[0] == ADAPTERS.get(FAMILY).END).nonzero()[-1]) + 1
    head = {k: v[:, :end] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v for k, v in one.items()}
    tail = {k: one[k][:, end:] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    return head, tail


def test_a_stream_answers_what_generate_answers_and_forgets_the_question():
    """Batch 2, left padding, rows of different frame counts: push the videos, ask the rest of the prompt."""
    model = tiny(FAMILY)
    cls = ADAPTERS.get(FAMILY)
    inputs, samples = batch_for(model, FAMILY, frames=[6, 4])
    config = VideoScanConfig(memory=2, keep=2)
    heads, tails = zip(*(split_after_video(s) for s in samples), strict=True)
    with vtc.apply(model, config) as handle:
        with torch.no_grad():
            whole = generate(model, inputs, n=4)
        stream = vtc.stream(handle)
        stream.push(cls.collate(model, list(heads)))
        before = stream.stats.cache_bytes
        question = cls.collate(model, list(tails))
        answer = stream.ask(question, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert torch.equal(answer, whole)
        assert stream.stats.cache_bytes == before  # the question and answer are forgotten
        assert torch.equal(stream.ask(question, max_new_tokens=2, min_new_tokens=2), whole[:, :2])
        stream.push(cls.collate(model, [split_after_video(s)[0] for s in batch_for(model, FAMILY, frames=[2, 2])[1]]))
        assert stream.stats.frames == [4, 3] and stream.stats.carriers == [2, 2]
        assert stream.ask(question, max_new_tokens=2).shape == (2, 2)


def test_a_batch_row_generates_what_it_generates_alone():
    model = tiny(FAMILY)
    inputs, samples = batch_for(model, FAMILY, frames=[6, 2])
    with vtc.apply(model, VideoScanConfig(memory=1, keep=3)) as handle, torch.no_grad():
        batched = generate(model, inputs, n=4)
        assert handle.stats.scan.frames == [3, 1] and handle.stats.scan.evicted == [2, 0]
        for row, one in enumerate(samples):
            assert torch.equal(generate(model, one, n=4)[0], batched[row])


def test_inputs_without_video_decode_as_the_model_does():
    model = tiny(FAMILY)
    inputs, _ = batch_for(model, FAMILY, images=[1], batch=1)
    with torch.no_grad():
        dense = generate(model, inputs, n=2)
        with vtc.apply(model, "videoscan"):
            assert torch.equal(generate(model, inputs, n=2), dense)


def test_refusals_name_the_problem():
    with pytest.raises(vtc.MissingCapabilityError, match="wrap a family that takes video"):
        vtc.wrap(tiny("llava"), "videoscan")
    model = tiny(FAMILY)
    with pytest.raises(vtc.MethodConflictError, match="frame by frame"):
        vtc.wrap(model, ["dart", "videoscan"])
    with pytest.raises(vtc.MethodConflictError, match="decoding loop"):
        vtc.wrap(model, ["videoscan", "deco"])
    with pytest.raises(ValueError, match="memory"):
        VideoScanConfig(memory=-1)
    with pytest.raises(ValueError, match="select_layer"):
        vtc.wrap(model, "videoscan", select_layer=9)
    with vtc.apply(model, "dart") as handle, pytest.raises(ValueError, match="wrapped with videoscan"):
        vtc.stream(handle)
    with vtc.apply(model, "videoscan") as handle:
        with pytest.raises(ValueError, match="nothing was pushed"):
            vtc.stream(handle).ask(torch.tensor([[5, 6]]))
        with pytest.raises(ValueError, match="num_beams"):
            inputs, _ = batch_for(model, FAMILY, frames=[2, 2])
            model.generate(**inputs, num_beams=2, max_new_tokens=2)


def test_the_fine_tune_trains_on_what_a_scan_computes():
    """One training forward over the scan's sequence under its visibility gives the scan's logits, and a
    few steps on one batch lower its loss (vtc.reference.videoscan_tune, the carrier path's fine-tune)."""
    from vtc.reference.videoscan_tune import answer_loss, finetune, training_batch

    model = tiny(FAMILY, num_layers=2)
    inputs, _ = batch_for(model, FAMILY, frames=[4, 2])
    labels = torch.where(torch.arange(inputs["input_ids"].shape[1]) >= inputs["input_ids"].shape[1] - 2,
                         inputs["input_ids"], -100)  # fmt: skip
    with vtc.apply(model, VideoScanConfig(memory=0)) as handle:
        batch = training_batch(handle, inputs, labels)
        expected = vtc.stream(handle).push(inputs)
        handle.deactivate()
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    last = (batch["labels"] != -100).long().cumsum(1).argmax(1)  # each row's last labelled token
    torch.testing.assert_close(logits[torch.arange(2), last], expected, atol=1e-4, rtol=1e-4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        losses = finetune(model, [(inputs, labels)] * 4, steps=4, lr=1e-3)
        assert len(losses) == 4 and losses[-1] < losses[0]
        with torch.no_grad():
            after = answer_loss(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])
        assert float(after) < losses[0]
        assert all(p.requires_grad for p in model.parameters()) and not model.training
    finally:
        model.load_state_dict(state)
