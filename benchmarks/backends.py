"""Per-part latency: eager torch vs ONNX Runtime (CPU), in one process, one run.

    .venv/bin/python benchmarks/backends.py [--model DIR] [--export DIR] [--repeats 30]

Parts: vision tower + projector, SAM image encoder, mask decoder (3 objects).
ONNX Runtime is timed with its threads' spinning off (the node's setting: the
LLM needs the cores right after) and on (faster alone), the latter last so its
lingering threads do not distort the others (ENV.md). With --device cuda, also times torch fp16 at the
preset's shapes (--preset full for the released model's shapes, random weights).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import median_ms

from nextchat_ros.backends import OnnxRuntimeBackend, TorchBackend
from nextchat_ros.model import build_model, load_pretrained
from nextchat_ros.model.build import DEFAULT_MODEL_DIR

# part -> the backend method that runs it
METHODS = {"vision": "vision", "sam_encoder": "sam_encoder", "mask": "masks"}


def inputs(config, device="cpu", dtype=torch.float32, objects=3):
    s, ss, e = config.vision.image_size, config.sam.image_size, config.sam.embedding_size
    xy = torch.rand(objects, 2) * 0.5
    return {
        "vision": (torch.randn(1, 3, s, s, device=device, dtype=dtype),),
        "sam_encoder": (torch.randn(1, 3, ss, ss, device=device, dtype=dtype),),
        "mask": (torch.randn(1, config.sam.prompt_embed_dim, e, e, device=device, dtype=dtype),
                 torch.cat([xy, xy + 0.3], 1).to(device, dtype),
                 torch.randn(objects, config.llm.hidden_size, device=device, dtype=dtype)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--export", type=Path, default=None, help="existing `nextchat export` dir (else exported now)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="tiny", help="with --device cuda: shapes of this preset (random weights)")
    args = parser.parse_args()

    if args.device.startswith("cuda"):
        model = load_pretrained(args.model) if args.model else build_model(args.preset, seed=0)
        model = model.to(args.device).set_precision(torch.float16).eval()
        backend = TorchBackend(model)
        print(f"torch fp16 on {torch.cuda.get_device_name(0)}, preset {args.preset}")
        with torch.inference_mode():
            for part, x in inputs(model.config, args.device, torch.float16).items():
                fn = getattr(backend, METHODS[part])
                print(f"{part:<12}{median_ms(fn, x, args.repeats, torch.cuda.synchronize):>10.2f} ms")
        return

    model_dir = args.model or (DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / "model.safetensors").is_file() else None)
    model = load_pretrained(model_dir) if model_dir else build_model("tiny", seed=0)
    export_dir = args.export
    if export_dir is None:
        from nextchat_export.onnx_export import export_onnx

        export_dir = Path(tempfile.mkdtemp(prefix="nextchat-export-"))
        export_onnx(model, export_dir, lint=False, progress=False)
    torch_backend, ort_backend = TorchBackend(model), OnnxRuntimeBackend(model, export_dir)
    ort_spin = OnnxRuntimeBackend(model, export_dir, allow_spinning=True)
    print(f"CPU, {torch.get_num_threads()} torch threads; model {model_dir or 'tiny (random init)'}; "
          f"median of {args.repeats}")
    print(f"{'part':<12}{'torch ms':>10}{'ort ms':>10}{'speed-up':>10}{'ort spin ms':>13}{'speed-up':>10}")
    with torch.inference_mode():
        for part, x in inputs(model.config).items():
            t_ms, o_ms, s_ms = (median_ms(getattr(b, METHODS[part]), x, args.repeats)
                                # spinning last: its busy threads would slow what follows
                                for b in (torch_backend, ort_backend, ort_spin))
            print(f"{part:<12}{t_ms:>10.2f}{o_ms:>10.2f}{t_ms / o_ms:>9.1f}x{s_ms:>13.2f}{t_ms / s_ms:>9.1f}x")


if __name__ == "__main__":
    main()
