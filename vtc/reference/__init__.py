"""The embedded reference VLM trained on ShapesQA (see vtc.reference.model)."""
