"""Convert a checkpoint of the Consolidator paper's code (or a plain timm ViT such as MoCo v3)
into a standard Hugging Face ViT folder.

    python scripts/convert_original.py --checkpoint ckpt.pth --output vit-consolidator
    python scripts/convert_original.py --checkpoint ckpt.pth --output vit-adapter --adapter
    python scripts/convert_original.py --checkpoint mocov3_vit_b.pth.tar --output mocov3-vit-b

Head count and channel shuffle are not stored in the weights: pass ``--num-heads`` (default
hidden/64) and ``--channel-shuffle`` when they differ from the defaults.
"""

import argparse
import sys

from consolidator_hf.cli import HelpFormatter
from consolidator_hf.convert import ConversionError, convert_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the paper's .pth (or a timm ViT; .safetensors too)")
    p.add_argument("--output", required=True, help="folder to create (must not exist or be empty)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (default: hidden/64)")
    p.add_argument("--channel-shuffle", action="store_true",
                   help="the branches were trained with channel shuffle")
    p.add_argument("--adapter", action="store_true",
                   help="write the frozen base + an unmerged consolidator adapter instead of merging")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output")
    args = p.parse_args(argv)
    try:
        convert_checkpoint(args.checkpoint, args.output, num_heads=args.num_heads,
                           channel_shuffle=args.channel_shuffle, adapter=args.adapter,
                           overwrite=args.overwrite, log=print)
    except (ConversionError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
