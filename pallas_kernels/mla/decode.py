"""Public MLA decode entry point: picks the TPU kernel, the GPU kernel or the jnp reference."""
import jax

from pallas_kernels.mla.decode_gpu import gpu_shapes_supported, mla_decode_gpu
from pallas_kernels.mla.decode_reference import check_decode_args, mla_decode_reference
from pallas_kernels.mla.decode_tpu import mla_decode_tpu

_IMPLS = ("auto", "tpu", "gpu", "reference")


def _auto_impl(q_rope, latent_pages) -> str:
  backend = jax.default_backend()
  if backend == "tpu":
    return "tpu"
  _, page_size, r = latent_pages.shape
  if backend == "gpu" and gpu_shapes_supported(r, q_rope.shape[-1], page_size):
    return "gpu"
  return "reference"


def mla_decode(q_latent, q_rope, latent_pages, rope_pages, page_table, lengths, *, scale,
               impl: str = "auto", interpret=False, num_splits=None):
  """One MLA decode step over a paged latent cache (flash-decoding on accelerators).

  Args:
    q_latent: [B, H, R] query absorbed into latent space.
    q_rope: [B, H, P] rope part of the query.
    latent_pages: [num_pages, page_size, R] latent cache.
    rope_pages: [num_pages, page_size, P] rope key cache.
    page_table: [B, max_pages] int page ids; entries past a sequence's length are never read.
    lengths: [B] int cached tokens per sequence, current token included (0 gives zeros).
    scale: softmax scale of the full (latent + rope) score.
    impl: "auto" (TPU kernel on TPU, GPU kernel on GPU when its shape rules hold, else the
      reference), "tpu", "gpu" or "reference".
    interpret: run the chosen kernel on CPU (True, or a pltpu.InterpretParams for "tpu").
    num_splits: context splits per sequence for the kernels (None: chosen from the shapes).

  Returns:
    o_latent [B, H, R] in q_latent's dtype; the caller applies W_UV.
  """
  if impl not in _IMPLS:
    raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
  check_decode_args(q_latent, q_rope, latent_pages, rope_pages, page_table, lengths)
  if impl == "auto":
    impl = _auto_impl(q_rope, latent_pages)
  args = (q_latent, q_rope, latent_pages, rope_pages, page_table, lengths)
  if impl == "tpu":
    return mla_decode_tpu(*args, scale=scale, num_splits=num_splits, interpret=interpret)
  if impl == "gpu":
    return mla_decode_gpu(*args, scale=scale, num_splits=num_splits, interpret=interpret)
  return mla_decode_reference(*args, scale=scale)
