"""The video reference VLM: a tiny LLaVA-OneVision trained on ShapesQA-Video (``vtc.reference.video.train``)."""
