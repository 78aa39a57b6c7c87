"""Test beds for the pack's tests and benchmarks (learned models shipped as small safetensors).

Never imported by the library or the nodes."""
