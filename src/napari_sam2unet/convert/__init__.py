"""PyTorch checkpoints to ONNX models (needs the [export] extra): load official and trained
checkpoints, export the contract's graph, make a faster graph that passes a parity check; and
ONNX models to QNN context binaries for Qualcomm NPUs (the qnn_ modules, [qnn] extra).

Nothing here is imported by the inference library; torch is imported on first use, so that
`sam2unet export --help` works without it.
"""
