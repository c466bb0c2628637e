"""retina: torch-free readers, preprocessing, synthetic cohort and ONNX inference for retinal imaging."""

__version__ = "0.1.0"
