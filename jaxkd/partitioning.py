"""The device mesh, and where every array of a run lives on it.

**Mesh** (``config.mesh``): axes ``('data', 'fsdp', 'tensor')``, their sizes from the config
(``-1``: the devices left over), built with ``jax.make_mesh`` over every device of every
process. The batch is split over ``('data', 'fsdp')``: both are data parallelism, and FSDP
also splits the weights, their gradients and optimizer state, so a device holds 1/fsdp of
them and XLA all-gathers a weight where a matmul needs it (ZeRO-3, Rajbhandari et al.
2020; PyTorch's FSDP). ``tensor`` splits the matmuls themselves (Megatron-LM, Shoeybi et
al. 2019); the batch is replicated over it.

**Parameters**: every dimension of a weight has a logical axis (:mod:`jaxkd.models.axes`:
``embed``, ``mlp``, ``vocab``, ``heads``, ...), and ``config.mesh.logical`` maps each logical
axis to mesh axes (the one rule table, as MaxText's ``logical_axis_rules``). A dimension
that its mesh axes do not divide is replicated over them (a 10-class head over ``tensor=4``)
and listed in :attr:`Layout.uneven`. ``config.mesh.rules`` gives whole parameters a spec
by regex (each rule must match a parameter).

**Everything shaped like a parameter follows it**: optimizer moments, pruning masks,
clustering assignments, LSQ steps (matched by the longest common path suffix and the same
shape); everything else (counters, codebooks, QAT observers, the RNG key) is replicated.
Teachers are laid out by the same table on the same mesh. XLA's SPMD partitioner (GSPMD,
Xu et al. 2021) partitions the step from these input and output shardings.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxkd.config import MESH_AXES
from jaxkd.config import Mesh as MeshSettings
from jaxkd.models import axes as model_axes
from jaxkd.schema import ConfigError, FieldError

BATCH_AXES = ("data", "fsdp")


def mesh_shape(settings: MeshSettings, num_devices: int) -> tuple[int, int, int]:
    """The sizes of ``('data', 'fsdp', 'tensor')``: ``-1`` resolved to the devices left."""
    sizes = [getattr(settings, a) for a in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    text = " x ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    if num_devices % known:
        raise FieldError("mesh", f": {text} does not divide the {num_devices} devices")
    if -1 in sizes:
        sizes[sizes.index(-1)] = num_devices // known
    elif known != num_devices:
        raise FieldError("mesh", f": {text} = {known} devices, but there are {num_devices} "
                                 "(set one axis to -1 to take the rest)")
    return tuple(sizes)


def resolved_shape(settings: MeshSettings) -> tuple[int, int, int]:
    """:func:`mesh_shape` over this job's devices (one-line errors name ``config.mesh``)."""
    try:
        return mesh_shape(settings, jax.device_count())
    except FieldError as e:
        raise e.under("config") from None


def make_mesh(settings: MeshSettings) -> Mesh:
    """The run's mesh over every device of every process."""
    shape = resolved_shape(settings)
    # Auto axes: XLA's partitioner propagates the shardings through the step (GSPMD);
    # jax.make_mesh's default, Explicit, would put them in every array's type.
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    _check_process_rows(mesh)
    return mesh


def _check_process_rows(mesh: Mesh) -> None:
    """Each process feeds its own rows of the batch (``jaxkd.data.pipeline``): the devices
    of one batch shard (a ``(data, fsdp)`` row, over ``tensor``) must be one process's, and
    each process's shards consecutive."""
    if jax.process_count() == 1:
        return
    procs = np.vectorize(lambda d: d.process_index)(mesh.devices).reshape(-1, mesh.shape["tensor"])
    if (procs != procs[:, :1]).any():
        raise ConfigError(f"config.mesh.tensor={mesh.shape['tensor']} spans processes: the "
                          "tensor axis must fit in one process's devices "
                          f"({jax.local_device_count()})")
    order = procs[:, 0]
    if (np.diff(order) < 0).any():
        raise ConfigError("config.mesh: the devices of each process are not consecutive "
                          "along (data, fsdp)")


def batch_shards(mesh: Mesh) -> int:
    """Into how many parts the batch is split (``data * fsdp``)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def path_of(keys: Sequence[Any]) -> str:
    """``'stage1_block0/conv1/kernel'`` of a pytree key path."""
    parts = []
    for k in keys:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


@dataclasses.dataclass
class Layout:
    """Where the arrays of one model live on ``mesh`` (see the module docstring).

    Attributes:
      mesh: the run's mesh.
      settings: ``config.mesh``.
      rules: the model's logical-axis rules (:func:`jaxkd.models.axes.rules_of`).
      uneven: ``'path dim N (size) over axes'`` of each dimension left replicated because
        its mesh axes do not divide it.
    """

    mesh: Mesh
    settings: MeshSettings
    rules: tuple
    uneven: list[str] = dataclasses.field(default_factory=list)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch(self) -> NamedSharding:
        """Leading (batch) dimension over ``('data', 'fsdp')``, the rest replicated."""
        return NamedSharding(self.mesh, P(BATCH_AXES))

    def spec(self, path: str, shape: tuple[int, ...]) -> P:
        """The partition spec of the parameter at ``path``."""
        for rule in self.settings.rules:
            if re.fullmatch(rule["params"], path):
                return self._fit(path, shape, tuple(rule["spec"]))
        logical = model_axes.axes_of(path, len(shape), self.rules)
        return self._fit(path, shape, tuple(self.settings.logical.get(a) if a else None
                                            for a in logical))

    def _fit(self, path: str, shape: tuple[int, ...], wanted: tuple) -> P:
        """``wanted`` (mesh axes per dimension) made valid: a mesh axis used once, trivial
        axes dropped, dimensions the axes do not divide replicated."""
        used: set[str] = set()
        out = []
        for dim, (size, axes) in enumerate(zip(shape, wanted + (None,) * len(shape),
                                               strict=False)):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            axes = tuple(a for a in axes if a not in used and self.mesh.shape[a] > 1)
            parts = math.prod(self.mesh.shape[a] for a in axes)
            if axes and size % parts:
                self.uneven.append(f"{path} dim {dim} ({size}) over {'x'.join(axes)}")
                axes = ()
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else (axes or None))
        while out and out[-1] is None:
            out.pop()
        return P(*out)

    def params(self, tree: Any) -> Any:
        """Shardings of a tree of parameters (or of any model variables: BatchNorm
        statistics follow the same rules)."""
        return jax.tree_util.tree_map_with_path(
            lambda keys, x: NamedSharding(self.mesh, self.spec(
                self._param_path(tuple(path_of(keys).split("/"))), x.shape)), tree)

    def gather(self, tree: Any) -> Any:
        """``tree`` (parameters, inside a jitted function) all-gathered over ``fsdp`` for
        the compute, still split over ``tensor``: FSDP gathers a weight before its matmul
        and reduce-scatters its gradient (the transpose of this constraint). Saying so
        explicitly also keeps XLA's partitioner off a path that gave wrong gradients on a
        2 x 2 x 2 mesh (openxla/xla#40034). The identity when ``fsdp`` is 1."""
        if self.mesh.shape["fsdp"] == 1:
            return tree

        def one(sharding, x):
            spec = [tuple(a for a in ((d,) if isinstance(d, str) else (d or ()))
                          if a != "fsdp") for d in sharding.spec]
            spec = [d[0] if len(d) == 1 else (d or None) for d in spec]
            return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(*spec)))

        return jax.tree.map(one, self.params(tree), tree)

    def follow(self, tree: Any, reference: Any) -> Any:
        """Shardings of ``tree`` whose leaves follow ``reference``'s parameters: a leaf whose
        path ends like a parameter's (the longest such) and has its shape gets its
        sharding; any other leaf is replicated (optimizer state, observers, counters)."""
        known: dict[tuple[str, ...], tuple[tuple[int, ...], P]] = {}
        for keys, x in jax.tree_util.tree_flatten_with_path(reference)[0]:
            path = path_of(keys)
            parts = tuple(path.split("/"))
            # The parameter's path and its suffixes of two or more names ('hidden1/kernel'
            # of 'params/hidden1/kernel'), the first registered winning.
            value = (tuple(x.shape), self.spec(self._param_path(parts), x.shape))
            for start in range(max(len(parts) - 1, 1)):
                known.setdefault(parts[start:], value)

        def one(keys, x):
            parts = tuple(path_of(keys).split("/"))
            for start in range(len(parts)):
                hit = known.get(parts[start:])
                if hit is not None and hit[0] == tuple(getattr(x, "shape", ())):
                    return NamedSharding(self.mesh, hit[1])
            return self.replicated

        return jax.tree_util.tree_map_with_path(one, tree)

    @staticmethod
    def _param_path(parts: tuple[str, ...]) -> str:
        """The parameter path the rules see: without the collection a reference names
        (``params/``, ``batch_stats/``, ``adapters/``)."""
        if parts and parts[0] in ("params", "batch_stats", "adapters", "model"):
            parts = parts[1:]
        return "/".join(parts)

    def check_rules(self, params: Any, model: str) -> None:
        """Every ``config.mesh.rules`` regex must match a parameter of ``model``."""
        paths = [path_of(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        for i, rule in enumerate(self.settings.rules):
            if not any(re.fullmatch(rule["params"], p) for p in paths):
                raise ConfigError(
                    f"config.mesh.rules[{i}].params={rule['params']!r} matches no parameter "
                    f"of model {model!r}; its parameters: {', '.join(paths[:6])}"
                    + (", ..." if len(paths) > 6 else ""))


def layout(mesh: Mesh, settings: MeshSettings, model_name: str) -> Layout:
    """The layout of model ``model_name`` (its logical axes) on ``mesh``."""
    return Layout(mesh=mesh, settings=settings, rules=model_axes.rules_of(model_name))


def per_device_bytes(tree: Any) -> int:
    """Bytes of ``tree`` held by one device (its first addressable shard of each array)."""
    return int(sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree)
                   if hasattr(x, "addressable_shards")))


def describe(mesh: Mesh) -> dict[str, int]:
    """``{'data': d, 'fsdp': f, 'tensor': t}`` as ``summary.json`` records it."""
    return {a: int(mesh.shape[a]) for a in MESH_AXES}
