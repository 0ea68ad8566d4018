"""Published-format checkpoints: a directory with config.json and one or many *.safetensors files
(with model.safetensors.index.json when sharded). safetensors only; nothing from a checkpoint is executed."""
import glob
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from ling.checkpoint.names import leaf_source
from ling.config import LingConfig
from ling.model import LingModel

INDEX_FILE = "model.safetensors.index.json"


def _tensor_files(directory: str) -> dict[str, str]:
    """Published tensor name -> file path: the index's weight_map when present, plus the tensors of any
    *.safetensors file the index does not name (some releases keep the MTP layer in its own file outside the
    index); without an index, every file's header."""
    files: dict[str, str] = {}
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: no 'weight_map' object")
        files = {n: os.path.join(directory, fn) for n, fn in weight_map.items()}
        for path in sorted(set(files.values())):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{index_path} names {os.path.basename(path)}, which does not exist")
    indexed = set(files.values())
    paths = [p for p in sorted(glob.glob(os.path.join(directory, "*.safetensors"))) if p not in indexed]
    if not files and not paths:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    for path in paths:
        with _open(path) as f:
            for name in f.keys():
                owner = files.get(name)
                if owner is None:
                    files[name] = path
                elif owner not in indexed:  # the index is authoritative; two unindexed files are ambiguous
                    raise ValueError(f"tensor {name} is in both {os.path.basename(owner)} and "
                                     f"{os.path.basename(path)} of {directory}")
    return files


def _open(path: str):
    try:
        return safe_open(path, framework="numpy")
    except Exception as e:  # safetensors raises its own error types for corrupt headers / truncated files
        raise ValueError(f"cannot read safetensors file {path}: {e}") from None


class _Reader:
    """Reads published tensors by name, keeping each file open once."""

    def __init__(self, files: dict[str, str]):
        self.files = files
        self._handles = {}

    def _handle(self, path):
        if path not in self._handles:
            self._handles[path] = _open(path)
        return self._handles[path]

    def shape(self, name):
        return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

    def dtype(self, name):
        """From the file header, without reading the tensor."""
        code = self._handle(self.files[name]).get_slice(name).get_dtype()
        return {"BF16": jnp.bfloat16, "F16": jnp.float16, "F32": jnp.float32, "F64": jnp.float64}.get(code, jnp.float32)

    def read(self, name) -> np.ndarray:
        path = self.files[name]
        try:
            return self._handle(path).get_tensor(name)
        except Exception as e:
            raise ValueError(f"cannot read tensor {name} from {path}: {e}") from None


def _check(reader: _Reader, sources: dict, abstract_leaves: dict, directory: str) -> None:
    expected = {}
    for path, src in sources.items():
        grid = src.names.ndim
        inner = tuple(abstract_leaves[path].shape[grid:])
        for name in np.ravel(src.names):
            expected[name] = src.published_shape(inner)
    problems = []
    for name in sorted(set(expected) - set(reader.files)):
        problems.append(f"missing tensor {name} (expected shape {list(expected[name])})")
    for name in sorted(set(reader.files) - set(expected)):
        if 0 in reader.shape(name):
            continue  # holds nothing: num_shared_experts 0 makes the reference save [0, hidden] shared experts
        problems.append(f"unexpected tensor {name} (shape {list(reader.shape(name))}) in "
                        f"{os.path.basename(reader.files[name])}")
    for name in sorted(set(expected) & set(reader.files)):
        found = reader.shape(name)
        if found != tuple(expected[name]):
            problems.append(f"tensor {name}: expected shape {list(expected[name])}, found {list(found)}")
    if problems:
        raise ValueError(f"checkpoint {directory} does not match its config.json:\n  " + "\n  ".join(problems))


def from_pretrained(directory: str | os.PathLike, dtype=None, mesh=None, *, attention_impl: str | None = None,
                    shardings=None, **model_kwargs) -> LingModel:
    """Load a published checkpoint directory into a LingModel.

    dtype: parameter and compute dtype (default: the checkpoint's). attention_impl overrides the config's
    kernel choice; model_kwargs (remat, scan_layers) go to LingModel. Each parameter is assembled tensor by tensor
    from the files straight into its placement (one device, or its sharding on `mesh` via sharding.rules), so no
    more than one published tensor beyond the placed shard is held on the host at a time.
    """
    directory = os.fspath(directory)
    config = LingConfig.from_hf(directory, **({} if attention_impl is None else {"attention_impl": attention_impl}))
    reader = _Reader(_tensor_files(directory))
    if dtype is None:
        name = "model.word_embeddings.weight"
        dtype = jnp.dtype(reader.dtype(name) if name in reader.files else jnp.float32)
    abstract = nnx.eval_shape(lambda: LingModel(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0),
                                                **model_kwargs))
    graphdef, state = nnx.split(abstract)
    leaves = dict(nnx.to_flat_state(state))
    sources = {path: leaf_source(config, path, var.shape) for path, var in leaves.items()}
    _check(reader, sources, leaves, directory)
    if shardings is None and mesh is not None:
        from sharding.rules import param_shardings  # deferred: the sharding package imports ling
        shardings = param_shardings(state, mesh)
    shardings_flat = dict(nnx.to_flat_state(shardings)) if shardings is not None else None
    device = jax.devices()[0]

    def build(path, var):
        src, shape, leaf_dtype = sources[path], var.shape, var.dtype
        grid = src.names.ndim
        inner = tuple(shape[grid:])

        def fill(index):
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            names = src.names[index[:grid]] if grid else src.names
            out = np.empty(np.shape(names) + inner, leaf_dtype)
            for pos in np.ndindex(np.shape(names)):
                out[pos] = src.to_ours(reader.read(names[pos]), inner).astype(leaf_dtype)
            return out[(Ellipsis,) + index[grid:]] if grid else out[index]

        sharding = (jax.tree.leaves(shardings_flat[path])[0] if shardings is not None
                    else jax.sharding.SingleDeviceSharding(device))
        return jax.make_array_from_callback(shape, sharding, fill)

    for path, var in leaves.items():
        var.set_value(build(path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def save_pretrained(model: LingModel, directory: str | os.PathLike, *, shard_size: int = 5 * 2**30) -> None:
    """Write `model` in the published format: config.json plus safetensors files of at most `shard_size` bytes
    (with an index when there are several). The directory is written beside the target and renamed into place,
    so an interrupted save never replaces a good checkpoint."""
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(directory) + "-", dir=parent)
    try:
        _write(model, tmp, shard_size)
        if os.path.exists(directory):
            old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(directory) + "-", dir=parent)
            os.rename(directory, os.path.join(old, "ckpt"))
            os.rename(tmp, directory)
            shutil.rmtree(old)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write(model: LingModel, directory: str, shard_size: int) -> None:
    config = model.config
    config.save(directory)
    shards, current, size = [], {}, 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = np.asarray(jax.device_get(var.get_value()))
        src = leaf_source(config, path, value.shape)
        grid = src.names.ndim
        for pos in np.ndindex(np.shape(src.names)):
            t = src.to_published(value[pos] if grid else value)
            if current and size + t.nbytes > shard_size:
                shards.append(current)
                current, size = {}, 0
            current[str(src.names[pos] if grid else src.names)] = t
            size += t.nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.nbytes
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
