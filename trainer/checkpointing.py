"""Train-state checkpoints over orbax's classic `CheckpointManager`: async periodic saves, keep-N, and a restore
that skips checkpoints whose write did not finish.

Each step directory holds two items: `state` (any pytree of arrays: params, optimizer state, step, PRNG key;
StandardSave/StandardRestore) and `meta` (a JSON dict: data-iterator state and run metadata; JsonSave/JsonRestore).

Orbax writes a step into `<step>.orbax-checkpoint-tmp-<t>/`, renames it to `<step>/` and writes
`<step>/commit_success.txt` last; old steps are deleted only after a new one is committed, so a failed write
never replaces a good checkpoint. A tmp directory, a step without the marker, or a step whose files fail to
restore (truncated data, bad JSON) is skipped with a warning and the previous step is tried. After a successful
restore, the unusable entries newer than the restored step are renamed into `<dir>/quarantine/` (never deleted):
the resumed run will write those step numbers again.

    ckpt = TrainCheckpointer(workdir / "ckpt", save_interval_steps=500, max_to_keep=3)
    stop = install_sigterm_handler()
    restored = ckpt.restore_latest(abstract_state, mesh=mesh)   # None: fresh start
    for step in range(start, total):
        state = train_step(state, batch)
        meta = {"data": data_iter.get_state()}
        ckpt.maybe_save(step, state, meta)
        if stop.is_set():
            ckpt.save_now(step, state, meta)
            break
    ckpt.close()
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

COMMIT_MARKER = "commit_success.txt"  # orbax's atomicity_types.COMMIT_SUCCESS_FILE
TMP_MARKER = ocp.utils.TMP_DIR_SUFFIX
QUARANTINE = "quarantine"


class NoUsableCheckpointError(RuntimeError):
    """Step directories exist but none of them could be restored."""


def _restore_target(abstract_state: Any, mesh: jax.sharding.Mesh | None) -> Any:
    """ShapeDtypeStructs with concrete shardings. Arrays become their ShapeDtypeStruct; a NamedSharding over an
    AbstractMesh (what nnx.eval_shape gives under jax.set_mesh) is rebuilt on `mesh`, because orbax cannot place
    arrays on an abstract mesh."""
    def leaf(path, x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(sharding.mesh, jax.sharding.AbstractMesh):
            if mesh is None:
                raise ValueError(
                    f"restore target leaf {jax.tree_util.keystr(path)} has a NamedSharding over an AbstractMesh "
                    f"(spec {sharding.spec}); pass mesh= (the concrete mesh) to restore_latest")
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(mesh, sharding.spec))
        return x

    return jax.tree_util.tree_map_with_path(leaf, abstract_state)


class TrainCheckpointer:
    """`maybe_save` every `save_interval_steps` (async), `save_now` on demand (blocking), keep `max_to_keep`."""

    def __init__(self, directory: str | os.PathLike, *, save_interval_steps: int, max_to_keep: int,
                 async_save: bool = True):
        if save_interval_steps < 1 or max_to_keep < 1:
            raise ValueError(f"save_interval_steps={save_interval_steps} and max_to_keep={max_to_keep} must be >= 1")
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise NoUsableCheckpointError(f"checkpoint directory {self.directory} exists and is not a directory")
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=max_to_keep,
                    save_interval_steps=save_interval_steps,
                    enable_async_checkpointing=async_save,
                    create=True,
                ),
            )
        except OSError as e:
            raise NoUsableCheckpointError(f"checkpoint directory {self.directory} is unreadable: {e}") from e

    # ----- saving -----
    def maybe_save(self, step: int, state: Any, meta: dict[str, Any]) -> bool:
        """Start an async save if `step` is on the interval; returns whether one was started."""
        if not self._manager.should_save(step):
            return False
        return self._save(step, state, meta, force=False)

    def save_now(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Save `step` regardless of the interval (SIGTERM, end of run) and block until it is committed."""
        if step not in self._manager.all_steps():
            self._save(step, state, meta, force=True)
        self._manager.wait_until_finished()

    def _save(self, step: int, state: Any, meta: dict[str, Any], force: bool) -> bool:
        try:
            json.dumps(meta)
        except TypeError as e:
            raise ValueError(f"checkpoint meta for step {step} is not JSON-serialisable: {e}") from None
        return self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and stop orbax's background threads."""
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    # ----- restoring -----
    def restore_latest(self, abstract_state: Any, mesh: jax.sharding.Mesh | None = None
                       ) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) of the newest complete checkpoint, or None when the directory holds none at all.

        `abstract_state` is the target pytree: ShapeDtypeStructs (or arrays) whose shardings say where each leaf
        is placed, which may differ from the saved sharding. Raises NoUsableCheckpointError naming the directory
        when step directories exist but none restores.
        """
        self._manager.wait_until_finished()
        self._manager.reload()
        target = _restore_target(abstract_state, mesh)
        try:
            names = os.listdir(self.directory)
        except OSError as e:
            raise NoUsableCheckpointError(f"checkpoint directory {self.directory} is unreadable: {e}") from e
        unusable = [n for n in names if TMP_MARKER in n]
        for name in unusable:
            log.warning("skipping incomplete checkpoint %s (write did not finish)", os.path.join(self.directory, name))
        failures = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            path = os.path.join(self.directory, str(step))
            if not os.path.exists(os.path.join(path, COMMIT_MARKER)):
                log.warning("skipping incomplete checkpoint %s (no %s)", path, COMMIT_MARKER)
                failures.append(f"{path}: no {COMMIT_MARKER}")
                unusable.append(str(step))
                continue
            try:
                out = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
            except Exception as e:  # orbax/tensorstore raise many types for truncated or missing files
                log.warning("skipping unreadable checkpoint %s: %s: %s", path, type(e).__name__, str(e)[:500])
                failures.append(f"{path}: {type(e).__name__}: {str(e)[:200]}")
                unusable.append(str(step))
                continue
            self._quarantine([n for n in unusable if TMP_MARKER in n or int(n) > step])
            return step, out.state, out.meta
        if failures:
            raise NoUsableCheckpointError(
                f"checkpoint directory {self.directory} has no usable step:\n  " + "\n  ".join(failures))
        self._quarantine(unusable)
        return None

    def _quarantine(self, names: list[str]) -> None:
        """Move unusable entries out of orbax's step namespace so the resumed run can reuse their step numbers."""
        if not names or jax.process_index() != 0:
            return
        qdir = os.path.join(self.directory, QUARANTINE)
        os.makedirs(qdir, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in names:
            dest = os.path.join(qdir, f"{name}.{stamp}")
            os.rename(os.path.join(self.directory, name), dest)
            log.warning("moved unusable checkpoint %s to %s", os.path.join(self.directory, name), dest)
        self._manager.reload()


def install_sigterm_handler() -> threading.Event:
    """Install a SIGTERM handler that only sets the returned event; the training loop polls `event.is_set()`,
    calls `save_now` and exits. Call from the main thread (Python delivers signals there)."""
    flag = threading.Event()

    def handler(signum, _frame):
        log.warning("received signal %d: will checkpoint and stop at the end of this step", signum)
        flag.set()

    signal.signal(signal.SIGTERM, handler)
    return flag
