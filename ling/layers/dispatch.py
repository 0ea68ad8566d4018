"""Which kernel variant the layers call, from `LingConfig.attention_impl` and the backend."""
import jax

from ling.config import LingConfig


def kernel_impl(config: LingConfig) -> tuple[str, bool]:
    """(impl, interpret) for the pallas_kernels ops.

    "auto" means Pallas on TPU/GPU and the jnp reference on CPU. "pallas" on CPU runs the TPU kernels in
    interpret mode (slow; for tests), since CPUs cannot run Pallas natively.
    """
    backend = jax.default_backend()
    mode = config.attention_impl
    if mode == "auto":
        mode = "reference" if backend == "cpu" else "pallas"
    if mode == "reference":
        return "reference", False
    if backend == "tpu":
        return "tpu", False
    if backend in ("gpu", "cuda", "rocm"):
        return "gpu", False
    return "tpu", True
