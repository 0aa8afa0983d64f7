"""Lowering cached graphs to deployment formats: ONNX (ONNX Runtime) and TensorRT."""
