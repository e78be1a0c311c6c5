"""An `sfi` command with one kind of the decode step's kernels left out, for the "where does a step's time go"
table: the step then runs without that kind's launches (outputs left as they were, so tokens are garbage and
only the timing means anything), and its time against the whole step's bounds what fusing that kind into its
neighbours could save. Usage: python3 bench/ablate.py KIND -- SFI-ARGS...; KIND is one of
  attention  the ranged attention launches and their merges
  merge      the merge launches alone (the attention's partial outputs are computed, never merged)
  norms      add + RMSNorm after the attention and after the MLP
  qkv        the q/k norm + rotary + cache write after the QKV product
  small      all four: the step's matrix products, sampling and the slow rows' refresh only
Run it with `sfi bench --no-torch --no-hf`: it patches the model's decode step only."""

import sys

import torch

KINDS = ("attention", "merge", "norms", "qkv", "small")


def _no_attention(q, *args, out=None, **kwargs):
    if out is not None:
        return out
    return torch.empty_like(q), torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)


def _no_norm(h, r, weight, eps):
    return h, h


def _no_qkv(qkv, *args, out=None, **kwargs):
    n_heads, d = args[9], args[5].shape[-1]
    q = qkv[:, : n_heads * d].view(qkv.shape[0], n_heads, d)
    return q if out is None else out


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def apply(kind: str) -> None:
    import sfi.attention
    import sfi.model
    import sfi_kernels.ranged_decode as ranged

    if kind in ("attention", "small"):
        sfi.attention.ranged_decode_attention = _no_attention
    if kind == "merge":
        ranged.FUSED_MERGE = False
        ranged._merge_splits_kernel = _NoLaunch()
    if kind in ("norms", "small"):
        sfi.model.add_rms_norm = _no_norm
    if kind in ("qkv", "small"):
        sfi.model.decode_qkv = _no_qkv


def main() -> None:
    if "--" not in sys.argv or sys.argv.index("--") != 2 or sys.argv[1] not in KINDS:
        sys.exit(__doc__)
    apply(sys.argv[1])
    print(f"ablate: without {sys.argv[1]}", file=sys.stderr)
    from sfi_cli.main import app

    app(sys.argv[3:])


if __name__ == "__main__":
    main()
