"""Test-wide setup: 8 fake CPU devices (must happen before jax initialises a backend)."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_num_cpu_devices", 8)

FIXTURE_DIR = pathlib.Path(__file__).parent / "fixtures" / "tiny-a"


@pytest.fixture(scope="module")
def golden():
    """The reference's outputs for the tiny-a checkpoint (see fixtures/tiny-a/README.md)."""
    return dict(np.load(FIXTURE_DIR / "golden.npz"))


@pytest.fixture(scope="module")
def model():
    """The tiny-a checkpoint loaded in fp32."""
    import ling  # after the device-count setting above

    return ling.from_pretrained(FIXTURE_DIR, dtype=jnp.float32)
