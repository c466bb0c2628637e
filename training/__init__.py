"""retina training: encoders, contrastive objectives, training loop, evaluation, ONNX export (torch)."""
