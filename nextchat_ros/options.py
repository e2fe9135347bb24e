"""Choices and defaults that the command line, the node and the predictor share,
in a module that imports nothing heavy: `nextchat ... --help` and a command's
argument errors must not wait for torch to import."""

# Where the vision and mask parts run (backends.py); the LLM always runs in torch.
BACKENDS = ("torch", "onnxruntime", "tensorrt")
# The precision the model runs in (`precision` on the CLI, the node and the launch file):
# every part but the box heads and SAM's prompt encoder, which stay fp32
# (model/nextchat.FP32_PARTS). The exported backends run graphs of it, and exports come
# in fp32 and, with `nextchat export --fp16`, fp16.
PRECISIONS = ("fp32", "fp16", "bf16")
EXPORT_PRECISIONS = ("fp32", "fp16")
# Longest answer, in tokens, unless a caller asks otherwise (the node's max_new_tokens too).
DEFAULT_MAX_NEW_TOKENS = 48
# Objects scored below this are dropped (the node's min_score too); an object's score is
# the model's P(yes) to "is there a {phrase} in the image?". 0 keeps every object: with
# the shipped model any threshold costs more than it saves on held-out scenes. Its yes/no
# answers were taught on colour + kind names only, so "the cup right of the bottle" or
# "the blue object" score low when they are there (0.05 already refuses 6 % of held-out
# referring expressions and drops REC Acc@0.5 from 0.81 to 0.755). For questions by
# colour and kind, 0.5 refuses 93 % of absent objects and 9 % of present ones.
DEFAULT_MIN_SCORE = 0.0
# How the predictor runs the LLM (engine/decoders.py): the static-cache engine, or
# transformers' own forward over a DynamicCache (the reference it is checked against).
DECODERS = ("engine", "eager")
# The LLM's precision (engine/quantize.py), where it should differ from `precision`;
# auto = the predictor's dtype.
LLM_PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8", "int4")
