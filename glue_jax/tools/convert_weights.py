r"""Convert upstream pretrained weights into torch-free ``.npz`` files.

  python -m glue_jax.tools.convert_weights --kind dinov2 --src dinov2_vitb14_reg4_pretrain.pth \
      --variant vitb14_reg --out weights/dinov2_vitb14_reg.npz
  python -m glue_jax.tools.convert_weights --kind vae --src sd-vae-ft-mse/ --out weights/sd_vae_ft_mse.npz
  python -m glue_jax.tools.convert_weights --kind inception \
      --src pt_inception-2015-12-05-6726825d.pth --out weights/fid_inception.npz
  python -m glue_jax.tools.convert_weights --kind vae --hub stabilityai/sd-vae-ft-ema --out ...

Sources: Hugging Face directories (config.json + safetensors), torch-hub
``.pth`` state dicts, pytorch-fid's ``.pth``; ``--hub NAME`` downloads through
huggingface_hub where a network exists.  The output is read back by
``load_dinov2`` / ``load_vae`` / ``load_inception`` without torch.  Every key
is checked; wrong or missing keys are an error that lists them.
"""

from __future__ import annotations

import argparse
import os
import sys

from glue_jax.models import dinov2_weights, inception_weights, vae_weights


def convert(kind: str, out: str, src: str | None = None, hub: str | None = None,
            variant: str | None = None) -> str:
  if os.path.exists(out):
    raise FileExistsError(f"{out} exists; refusing to overwrite")
  if bool(src) == bool(hub):
    raise ValueError("give exactly one of --src and --hub")
  if kind == "dinov2":
    w = dinov2_weights
    model = w.from_pretrained_hub(hub) if hub else w.load_dinov2(src, variant)
  elif kind == "vae":
    w = vae_weights
    model = w.from_pretrained_hub(hub) if hub else w.load_vae(src)
  elif kind == "inception":
    w = inception_weights
    if hub:
      raise ValueError("inception weights come from pytorch-fid's .pth (--src)")
    model = w.load_inception(src)
  else:
    raise ValueError(f"unknown kind {kind!r}")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = out + ".tmp.npz"
  w.save_npz(model, tmp)
  os.replace(tmp, out)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--kind", required=True, choices=["dinov2", "vae", "inception"])
  p.add_argument("--src", help="local file or directory in the upstream format")
  p.add_argument("--hub", help="Hugging Face hub name (needs a network)")
  p.add_argument("--variant", help="DINOv2 variant for .pth files, e.g. vitb14_reg")
  p.add_argument("--out", required=True, help="output .npz")
  a = p.parse_args(argv)
  try:
    print("wrote", convert(a.kind, a.out, a.src, a.hub, a.variant))
  except Exception as e:  # clear one-line error for the CLI
    print(f"convert_weights: error: {type(e).__name__}: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
