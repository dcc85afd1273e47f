"""Model runtime: ONNX Runtime sessions, validated loading, and the atomically swapped handle."""
