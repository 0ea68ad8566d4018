"""Test-wide setup: 8 fake CPU devices (must happen before jax initialises a backend)."""
import os
import pathlib

import jax

jax.config.update("jax_num_cpu_devices", 8)

FIXTURE_DIR = pathlib.Path(__file__).parent / "fixtures" / "tiny-a"
