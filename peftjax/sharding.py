"""Scale-out on JAX's SPMD runtime: a ``data`` x ``fsdp`` x ``tensor`` device mesh and where every leaf lives on it.

A run's arrays are global ``jax.Array`` s laid out by ``NamedSharding(mesh, PartitionSpec)``; the train step is one
``jax.jit`` with those shardings in and out, and XLA's SPMD partitioner (GSPMD) inserts the collectives. Nothing
here communicates by hand. With D x F x T devices:

- **batches** are split over ``data`` x ``fsdp`` (D x F groups of rows): data parallelism, and FSDP's data side
  (a batch size they do not divide is split over the one of them that divides it);
- **frozen base weights** are split by the logical-axis table :data:`LOGICAL_RULES`: a linear layer's (d_in, d_out)
  kernel has the logical axes of :data:`LINEAR_AXES` (``hidden`` -> ``fsdp`` shards the model width of every
  kernel F ways, ZeRO-3 / FSDP as in Rajbhandari et al. 2020; ``heads`` / ``mlp`` -> ``tensor`` splits attention
  heads and the MLP's columns (gate, up) and rows (down) T ways, Megatron-LM's tensor parallelism, Shoeybi et al.
  2019); the embedding table and an untied output head (vocabulary, width) are ``(embedding, hidden)``, the
  vocabulary split over ``fsdp`` and ``tensor`` (:data:`LOGICAL_RULES`). So a kernel holds
  1 / (F T) of its bytes per device and the frozen tree ``total / (F T)`` plus the replicated 1-D leaves (norm
  scales, biases);
- **quantized kernels** (:class:`~peftjax.quant.QArray`, codes flattened row-major in the (d_out, d_in) layout) are
  split into contiguous runs of whole blocks over the same mesh axes as the dense kernel, their scales (and the
  double-quantized scale codes) over the same axes, so shard k of the codes and shard k of the scales are the
  same blocks: a device dequantizes its blocks with its own scales. A QArray whose blocks do not fall on shard
  boundaries stays replicated;
- **adapters** follow the kernel they adapt: an axis of length d_in in first position takes the kernel's input
  sharding, an axis of length d_out in last position its output sharding (LoRA A (d_in, r) like the input axis,
  B (r, d_out) like the output axis), the rank axis and 1-D leaves are replicated;
- **optimizer state** is laid out like the parameters it belongs to (:func:`optimizer_shardings`).

A mesh axis is used for an array axis only when it divides it (else that axis is replicated) and at most once per
array. The per-device bytes of a tree (:func:`per_device_nbytes`) are read from its arrays' shardings.
"""
from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from peftjax.errors import PeftjaxError
from peftjax.models.llama import Linear
from peftjax.quant import QArray
from peftjax.quant.double_quant import DoubleQuantScales

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the rows of a batch are split over both

# logical axis -> mesh axis (None: replicated); ``mesh.rules`` in a run config overrides entries
DISTRIBUTED_ENV = "PEFTJAX_DISTRIBUTED"  # "1": start jax.distributed from the cluster's own environment

# (a tuple: those mesh axes together, each kept while the product still divides the array axis). The embedding's
# vocabulary is split over fsdp and tensor: under FSDP a width-split table would make XLA gather the whole table for
# the head's logits (measured 3 copies, 335 MiB per device, on SmolLM2's shape); split by vocabulary, each device
# computes its slice of the logits from a gathered chunk of rows (vocabulary-parallel cross-entropy, as Megatron-LM
# does over tensor).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {"embedding": ("fsdp", "tensor"), "hidden": "fsdp",
                                                         "heads": "tensor", "mlp": "tensor"}

# a linear layer's module name -> the logical axes of its (d_in, d_out) kernel
LINEAR_AXES = {"q_proj": ("hidden", "heads"), "k_proj": ("hidden", "heads"), "v_proj": ("hidden", "heads"),
               "o_proj": ("heads", "hidden"), "gate_proj": ("hidden", "mlp"), "up_proj": ("hidden", "mlp"),
               "down_proj": ("mlp", "hidden")}
# the (vocabulary, width) tables: the embedding (also the tied head) and an untied output head
EMBEDDING_AXES = {"embed_tokens": ("embedding", "hidden"), "lm_head": ("embedding", "hidden")}


def make_mesh(axes: dict[str, int | None], devices=None) -> Mesh:
    """The ``data`` x ``fsdp`` x ``tensor`` mesh over ``devices`` (default: every device of every process);
    ``data=None`` takes the devices ``fsdp`` x ``tensor`` leave. The product must be the number of devices."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    fsdp, tensor = axes.get("fsdp") or 1, axes.get("tensor") or 1
    data = axes.get("data")
    if data is None:
        if n % (fsdp * tensor):
            raise PeftjaxError(f"mesh fsdp={fsdp} x tensor={tensor} does not divide the {n} devices; choose sizes "
                               f"whose product divides {n}")
        data = n // (fsdp * tensor)
    if data * fsdp * tensor != n:
        raise PeftjaxError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} devices, but "
                           f"{n} are in use; choose sizes whose product is {n}")
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` (the ``--mesh`` flag) -> ``{"data": 2, "fsdp": 4}``."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition("=")
        if name not in MESH_AXES or not size.isdigit() or int(size) < 1:
            raise PeftjaxError(f"--mesh expects axis=size pairs of {', '.join(MESH_AXES)} with sizes >= 1, e.g. "
                               f"data=2,fsdp=4; got {part!r}")
        out[name] = int(size)
    return out


def mesh_overrides(text: str | None) -> list[str]:
    """The ``--set mesh.AXIS=N`` overrides that ``--mesh`` stands for."""
    return [f"mesh.{k}={v}" for k, v in parse_mesh(text).items()] if text else []


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Start ``jax.distributed`` (once, before any device is touched) when a multi-process run is asked for: by the
    arguments (``mesh.coordinator`` / ``num_processes`` / ``process_id``), by the environment variables
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, or by ``PEFTJAX_DISTRIBUTED=1``, with
    which ``jax.distributed.initialize()`` detects a SLURM, Open MPI or TPU-slice job by itself. CPU devices of
    different processes exchange data over gloo."""
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    if jax.distributed.is_initialized() or not (coordinator or env.get(DISTRIBUTED_ENV) == "1"):
        return  # one process
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def barrier(name: str) -> None:
    """Every process waits here for the others (nothing to wait for in a one-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def host_value(x) -> np.ndarray:
    """The whole of a (possibly sharded) array on this host; across processes it is gathered from all of them
    (every process must call it)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@dataclasses.dataclass(frozen=True)
class _Kernel:
    d_in: int
    d_out: int
    axes: tuple[str | None, str | None]  # mesh axes of the input and output dimension


class Layout:
    """Where the leaves of one model live on ``mesh`` (module docstring); ``rules`` overrides :data:`LOGICAL_RULES`.

    ``Layout(model, mesh)`` reads the model's linear layers (their sizes and logical axes); ``shardings(tree)`` then
    gives the ``NamedSharding`` of every leaf of that model's trainable or frozen state."""

    def __init__(self, model: nnx.Module, mesh: Mesh, rules: dict[str, str | None] | None = None):
        self.mesh = mesh
        self.rules = {**LOGICAL_RULES, **(rules or {})}
        self.replicated = NamedSharding(mesh, P())
        self._kernels: dict[tuple, _Kernel] = {}
        for path, node in nnx.iter_graph(model):
            if isinstance(node, Linear):
                owner = _owner(path, LINEAR_AXES)
                if owner is not None:
                    logical = LINEAR_AXES[path[owner]]
                    self._kernels[path[: owner + 1]] = _Kernel(node.d_in, node.d_out,
                                                               tuple(self.rules[a] for a in logical))

    @property
    def batch_ways(self) -> int:
        return math.prod(self.mesh.shape[a] for a in BATCH_AXES)

    def _size(self, axis) -> int:
        return self.mesh.shape[axis]

    def _spec(self, shape, axes) -> P:
        """``axes[i]`` (a mesh axis, a tuple of them, or None) on array axis i, each mesh axis at most once per
        array; of a rule's mesh axes, those not used yet whose sizes, multiplied in order, still divide the axis."""
        used, out = set(), []
        for n, axis in zip(shape, axes):
            chosen = []
            for a in mesh_axes(axis):
                if a not in used and n % (math.prod(map(self._size, chosen)) * self._size(a)) == 0:
                    chosen.append(a)
            used |= set(chosen)
            out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
        return P(*out)

    def logical_spec(self, shape, logical) -> P:
        """The PartitionSpec of an array of ``shape`` whose axes have the ``logical`` axis names (None: whole)."""
        return self._spec(shape, [None if a is None else self.rules[a] for a in logical])

    def _leaf(self, path, x) -> NamedSharding | QArray:
        names = _names(path)
        if isinstance(x, QArray):
            owner = _owner(names, LINEAR_AXES)
            kernel = self._kernels.get(names[: owner + 1]) if owner is not None else None
            return self._qarray(x, kernel)
        shape = np.shape(x)
        owner = _owner(names, EMBEDDING_AXES)
        if owner is not None and len(shape) == 2:
            return NamedSharding(self.mesh, self.logical_spec(shape, EMBEDDING_AXES[names[owner]]))
        owner = _owner(names, LINEAR_AXES)
        kernel = self._kernels.get(names[: owner + 1]) if owner is not None else None
        if kernel is None or len(shape) < 2:  # 1-D leaves (norm scales, biases, vectors) are small: replicated
            return self.replicated
        axes = [None] * len(shape)
        if shape[0] == kernel.d_in:
            axes[0] = kernel.axes[0]
        if shape[-1] == kernel.d_out:
            axes[-1] = kernel.axes[1]
        return NamedSharding(self.mesh, self._spec(shape, axes))

    def _qarray(self, q: QArray, kernel: _Kernel | None) -> QArray:
        """Codes and per-block scales split into the same contiguous runs of whole blocks (module docstring)."""
        rep = self.replicated
        axes = () if kernel is None else tuple(dict.fromkeys(a for rule in kernel.axes[::-1] for a in mesh_axes(rule)))
        ways = math.prod(self._size(a) for a in axes)
        per_shard = q.size // ways if ways and q.size % ways == 0 else 0
        aligned = ways > 1 and per_shard and q.padding == 0 and per_shard * q.bits % 8 == 0 \
            and q.codes.shape[0] % ways == 0
        blockwise = q.block_size is not None and q.axis is None
        if aligned and blockwise:
            aligned = per_shard % q.block_size == 0
        if not aligned:
            return jax.tree.map(lambda _: rep, q)
        flat = NamedSharding(self.mesh, P(axes))
        if not blockwise:  # one scale per tensor or per channel: small, kept whole on every device
            return dataclasses.replace(q, codes=flat, scales=jax.tree.map(lambda _: rep, q.scales),
                                       zero_points=None if q.zero_points is None else rep)
        if isinstance(q.scales, DoubleQuantScales):
            groups = q.scales.codes.shape[0]
            whole = (groups // ways) % q.scales.block_size == 0 and q.scales.absmax.shape[0] % ways == 0
            scales = dataclasses.replace(q.scales, codes=flat, absmax=flat if whole else rep, offset=rep)
        else:
            scales = flat
        return dataclasses.replace(q, codes=flat, scales=scales, zero_points=None if q.zero_points is None else flat)

    def shardings(self, tree):
        """The ``NamedSharding`` of every leaf of a trainable or frozen state of the model (a QArray gets a QArray
        of shardings, so the result has the tree's structure)."""
        return jax.tree_util.tree_map_with_path(self._leaf, tree, is_leaf=lambda x: isinstance(x, QArray))

    def batch(self, rows: int, axis: int = 0) -> NamedSharding:
        """Rows (array axis ``axis``) over ``data`` x ``fsdp``; when ``rows`` (the batch size) does not split that
        many ways, over the one of them that divides it (the other axis then holds the same rows: the result is the
        same, the work is repeated; :meth:`batch_note` says so)."""
        for axes in (BATCH_AXES, *((a,) for a in sorted(BATCH_AXES, key=self._size, reverse=True)), ()):
            if rows % math.prod(self._size(a) for a in axes) == 0:
                return NamedSharding(self.mesh, P(*([None] * axis), axes or None))
        raise AssertionError("unreachable: () divides every batch")

    def batch_note(self, rows: int) -> str | None:
        """One line when a batch of ``rows`` cannot be split over all ``data`` x ``fsdp`` devices."""
        if rows % self.batch_ways == 0:
            return None
        return (f"peftjax: note: train.batch_size {rows} does not split over mesh data x fsdp = {self.batch_ways} "
                f"devices, so some devices repeat the same rows; a multiple of {self.batch_ways} uses them all")


def mesh_axes(rule) -> tuple[str, ...]:
    """The mesh axes of a logical-axis rule: a name, a tuple or list of names, or None (none)."""
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def in_linear_layer(path) -> bool:
    """Whether a ``jax.tree_util`` key path lies inside one of the linear layers of :data:`LINEAR_AXES`."""
    return _owner(_names(path), LINEAR_AXES) is not None


def _owner(names, table) -> int | None:
    """Index of the last path element that is a module name of ``table``."""
    hits = [i for i, n in enumerate(names) if isinstance(n, str) and n in table]
    return hits[-1] if hits else None


def optimizer_shardings(opt_state, params, param_shardings, replicated: NamedSharding):
    """Shardings of an (abstract) optax state: a leaf whose key path ends in a parameter's path and has its shape
    (Adam's moments, also inside ``optax.partition`` / masked states) is laid out like that parameter, the rest
    (step counts) replicated."""
    by_path = {_key(path): (np.shape(x), s) for (path, x), s in
               zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_shardings))}

    def leaf(path, x):
        parts = _key(path).split("/")
        for i in range(len(parts)):
            shape, s = by_path.get("/".join(parts[i:]), (None, None))
            if s is not None and shape == np.shape(x):
                return s
        return replicated

    return jax.tree_util.tree_map_with_path(leaf, opt_state)


def _key(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def put(tree, shardings):
    """``tree`` placed on the mesh with ``shardings`` (a tree like it, or one sharding for every leaf); each process
    fills the shards on its own devices from its copy of ``tree``."""
    if isinstance(shardings, NamedSharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def one(x, s):
        if isinstance(x, jax.Array) and x.sharding == s:  # already there (a checkpoint restored into ``s``)
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, s)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # a key: its integer data, wrapped again
            return jax.random.wrap_key_data(one(jax.random.key_data(x), s), impl=jax.random.key_impl(x))
        return jax.device_put(np.asarray(x), s)  # across processes jax places host values, not device arrays

    return jax.tree.map(one, tree, shardings)


def put_rows(fetch, rows: list[np.ndarray], sharding: NamedSharding, axis: int = 0):
    """A global batch whose rows (array axis ``axis``) are ``fetch(row indices)``: ``rows`` holds one index array per
    micro-batch and ``fetch`` is called once, with only the rows this process's devices hold, so each host reads
    just its shard of the batch."""
    n = len(rows[0])
    positions = {d: np.arange(n)[index[axis]]
                 for d, index in sharding.addressable_devices_indices_map((len(rows),) * axis + (n,)).items()}
    local = np.unique(np.concatenate(list(positions.values())))  # this host's rows, in order
    fetched = fetch([r[local] for r in rows])

    def leaf(x):
        x = np.asarray(x)
        shape = x.shape[:axis] + (n,) + x.shape[axis + 1:]

        def callback(index):
            mine = np.searchsorted(local, np.arange(n)[index[axis]])
            return np.take(x, mine, axis=axis)[tuple(slice(None) if d == axis else s for d, s in enumerate(index))]

        return jax.make_array_from_callback(shape, sharding, callback)

    return jax.tree.map(leaf, fetched)


def _names(path) -> tuple:
    """The keys, indices and attribute names of a ``jax.tree_util`` key path."""
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in path)


def per_device_nbytes(tree) -> int:
    """Bytes the largest-holding device stores of ``tree``'s arrays, read from their shardings."""
    per = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + shard.data.size * x.dtype.itemsize
    if not per:
        return 0
    return max(per.values())


__all__ = ["BATCH_AXES", "EMBEDDING_AXES", "LINEAR_AXES", "LOGICAL_RULES", "Layout", "MESH_AXES", "barrier",
           "host_value", "in_linear_layer", "initialize_distributed", "make_mesh", "mesh_axes", "mesh_overrides",
           "optimizer_shardings", "parse_mesh", "per_device_nbytes", "put", "put_rows"]
