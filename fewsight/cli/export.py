"""``fewsight export``: a detector's inference graph to ONNX."""

from __future__ import annotations

import argparse
from typing import Any

NAME = "export"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        NAME,
        help="export a detector's inference graph to ONNX",
        description="Export a detector file to ONNX (needs fewsight[onnx]).",
    )
    p.add_argument("--checkpoint", required=True, help="a model file (model.pt from training, or enroll's output) or a .ckpt")
    p.add_argument("--out", default="model.onnx", help="output .onnx file (default: model.onnx)")
    p.add_argument("--image-size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"),
                   help="input image size of the exported graph (default 128 128)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")


def run(args: argparse.Namespace) -> int:
    from fewsight.cli.common import output_file
    from fewsight.hub import load_model
    from fewsight.models import export_onnx

    output_file(args.out, [args.checkpoint])
    model = load_model(args.checkpoint)
    info = export_onnx(model, args.out, image_size=tuple(args.image_size), opset=args.opset)
    h, w = args.image_size
    print(f"wrote {args.out} ({type(model).__name__}, input [B, 3, {h}, {w}], {len(info.classes)} classes)")
    return 0
