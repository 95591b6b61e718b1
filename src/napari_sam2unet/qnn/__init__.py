"""Qualcomm's QNN runtime (the onnxruntime-qnn wheel): QNN-ready graphs, context binaries, the runtime."""
