"""Device meshes over the five parallelism axes, and the mesh the model code sees while it traces.

Every mesh has all five axes, in the order below (an unused axis has size 1), so specs and rules never depend on
which parallelisms a run happens to use. The order puts the axes with the heaviest traffic innermost, where
`create_device_mesh` lays them on the fastest links: tensor (per-layer all-reduces), context (state and latent
passing), expert (token all-to-all), then fsdp (one weight all-gather per layer) and data (one gradient
reduction per step). Axes are Auto (GSPMD); see docs/sharding.md for why.
"""
import math
from typing import Mapping

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")
# Only these may span slices (DCN): their traffic is one reduction per step or one weight gather per layer.
DCN_AXES = ("data", "fsdp")


def _check_names(axes: Mapping[str, int], what: str) -> None:
    unknown = sorted(set(axes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"{what}: unknown mesh axes {unknown}; the axes are {list(MESH_AXES)}")


def resolve_axis_sizes(axes: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
    """Sizes of MESH_AXES from a dict of some of them; one -1 takes whatever `n_devices` leaves.

    Raises ValueError when the sizes do not multiply to `n_devices`.
    """
    _check_names(axes, "make_mesh axes")
    sizes = [int(axes.get(name, 1)) for name in MESH_AXES]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1 or any(s < 1 and s != -1 for s in sizes):
        raise ValueError(f"axis sizes must be >= 1 with at most one -1; got {dict(axes)}")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if n_devices % known:
            raise ValueError(f"axes {dict(axes)}: {n_devices} devices are not divisible by {known}")
        sizes[fill[0]] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(f"axes {dict(axes)} multiply to {math.prod(sizes)}, but there are {n_devices} devices")
    return tuple(sizes)


def make_mesh(axes: Mapping[str, int], *, dcn_axes: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A Mesh with Auto axes MESH_AXES.

    axes: sizes within a slice (ICI), e.g. {"fsdp": -1, "tensor": 4}; missing axes have size 1 and one -1 fills
      the devices left (per slice when dcn_axes is given).
    dcn_axes: for multi-slice runs, how many slices each axis spans, e.g. {"data": 4}; only "data" and "fsdp"
      may span slices. The mesh axis size is then the ICI size times the DCN size.
    devices: defaults to jax.devices().
    """
    devices = list(jax.devices() if devices is None else devices)
    if not dcn_axes:
        sizes = resolve_axis_sizes(axes, len(devices))
        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    _check_names(dcn_axes, "make_mesh dcn_axes")
    if any(int(s) < 1 for s in dcn_axes.values()):
        raise ValueError(f"dcn_axes sizes must be >= 1 (no -1); got {dict(dcn_axes)}")
    across = sorted(name for name, s in dcn_axes.items() if s > 1 and name not in DCN_AXES)
    if across:
        raise ValueError(f"dcn_axes {dict(dcn_axes)}: only {list(DCN_AXES)} may span slices, not {across}")
    dcn = tuple(int(dcn_axes.get(name, 1)) for name in MESH_AXES)
    n_slices = math.prod(dcn)
    if len(devices) % n_slices:
        raise ValueError(f"{len(devices)} devices do not split into {n_slices} slices")
    ici = resolve_axis_sizes(axes, len(devices) // n_slices)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def make_abstract_mesh(axes: Mapping[str, int], n_devices: int) -> AbstractMesh:
    """The AbstractMesh of make_mesh(axes) on `n_devices` devices: shapes and shardings without devices
    (for planning a topology that is not attached)."""
    sizes = resolve_axis_sizes(axes, n_devices)
    return AbstractMesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def active_mesh():
    """The mesh set by `jax.set_mesh` as the model code sees it (an AbstractMesh), or None when there is none,
    it has one device, or we are already inside a shard_map (its axes are Manual there).

    Raises ValueError for Explicit axes: the sharding layer places arrays with GSPMD constraints and shard_map
    islands, which need Auto axes (build meshes with make_mesh).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    types = set(mesh.axis_types)
    if AxisType.Manual in types:
        return None
    if AxisType.Explicit in types:
        raise ValueError(f"mesh {mesh} has Explicit axes; ling's sharding needs Auto axes (use sharding.make_mesh)")
    return mesh


def axis_size(mesh, names) -> int:
    """Product of the sizes of mesh axes `names` (a name, a tuple of names, or None)."""
    if names is None:
        return 1
    names = (names,) if isinstance(names, str) else names
    return int(np.prod([mesh.shape[n] for n in names]))
