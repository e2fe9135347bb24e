"""Choices and defaults that the command line, the node and the predictor share,
in a module that imports nothing heavy: `nextchat ... --help` and a command's
argument errors must not wait for torch to import."""

# Where the vision and mask parts run (backends.py); the LLM always runs in torch.
BACKENDS = ("torch", "onnxruntime", "tensorrt")
# Precisions of the exported graphs (`nextchat export --fp16` adds fp16).
PRECISIONS = ("fp32", "fp16")
# Longest answer, in tokens, unless a caller asks otherwise (the node's max_new_tokens too).
DEFAULT_MAX_NEW_TOKENS = 48
# How the predictor runs the LLM (engine/decoders.py): the static-cache engine, or
# transformers' own forward over a DynamicCache (the reference it is checked against).
DECODERS = ("engine", "eager")
# The LLM's precision (engine/quantize.py); auto = the predictor's dtype.
LLM_PRECISIONS = ("auto", "fp32", "bf16", "int8", "int4")
