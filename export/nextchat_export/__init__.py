"""Export of the vision and mask parts: ONNX graphs (with parity checks and
polygraphy lint) and TensorRT engines. Imports the core; the core never imports
this package (it only reads what this package writes)."""
