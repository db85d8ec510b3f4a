"""What a rank saves and restores when a CheckpointManager checkpoints a multi-rank run.

The state given to ``dcp.save`` is::

    {"items": {name: state}, "ranks": {"rank<r>": {"rng": ..., "generators": {...}}}}

Modules and optimizers go through ``torch.distributed.checkpoint.state_dict``
(``get_model_state_dict`` / ``get_optimizer_state_dict``: DDP, FSDP2/DTensor and plain
modules alike; optimizer state keyed by parameter name), so each rank holds only its shards
and DCP writes replicated tensors once. Other stateful items (schedulers, scalers) and plain
values are the same on every rank and written once. What differs per rank (random
generators, ``torch.Generator`` items) has a key of its own rank.

On restore, modules and optimizers are loaded through ``dcp.load`` into templates of their
current (possibly differently sharded) state, which is how a checkpoint saved on N ranks
restores on M; everything else is read whole from the run. Per-rank state is restored only
when the world size is unchanged: rank 3 of 4 has no counterpart on 2 ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

from .._report import ResumeReport
from .._tensors import MapLocation
from ..errors import CorruptCheckpointError, RestoreMismatchError
from ..run import _rng
from ..run._manager_args import state_of
from ..run._readers import GENERATOR, ITEMS, STATE, _check_target, _mismatch, metrics_of
from ..run._sharded import load_state, parse
from ..run._store import RunStore
from ._collective import Group
from ._reader import StorageReader

RANKS = "ranks"


def rank_key(rank: int) -> str:
    return f"rank{rank}"


def state_to_save(items: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """This rank's part of a checkpoint of ``items`` (see the module docstring)."""
    modules = {name: item for name, item in items.items() if isinstance(item, nn.Module)}
    saved: dict[str, Any] = {}
    generators: dict[str, Any] = {}
    for name, item in items.items():
        if isinstance(item, nn.Module):
            saved[name] = get_model_state_dict(item)
        elif isinstance(item, torch.optim.Optimizer):
            saved[name] = optimizer_state(item, owner(item, modules, name))
        elif isinstance(item, torch.Generator):
            generators[name] = state_of(item)
        else:
            saved[name] = state_of(item)
    mine = {"rng": _rng.capture(), "generators": generators}
    return {ITEMS: saved, RANKS: {rank_key(rank): mine}}


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name. ``get_optimizer_state_dict`` shapes
    the state of an optimizer that has not stepped yet by stepping it once with zero grads
    (Adam's ``step`` becomes 1); that must not change the caller's run: such an optimizer
    is saved as it is (no state) and left as it was."""
    fresh = not optimizer.state
    state = get_optimizer_state_dict(model, optimizer)
    if fresh:
        optimizer.state.clear()
        return {"state": {}, "param_groups": state["param_groups"]}
    return state


def owner(
    optimizer: torch.optim.Optimizer, modules: Mapping[str, nn.Module], name: str
) -> nn.Module:
    """The module item whose parameters ``optimizer`` updates (its state is keyed by their
    names).

    Raises:
        ValueError: no module item holds every parameter of the optimizer.
    """
    wanted = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for module in modules.values():
        if wanted <= {id(p) for p in module.parameters()}:
            return module
    raise ValueError(
        f"the optimizer item {name!r} updates parameters of no module item "
        f"({sorted(modules) or 'none given'}); under torch.distributed, optimizer state is "
        "saved by parameter name, so pass the model it trains in the same call "
        "(save(step, model=model, optimizer=opt))"
    )


def restore(
    store: RunStore,
    step: int,
    manifest: dict[str, Any],
    *,
    items: Mapping[str, Any],
    strict: bool,
    map_location: MapLocation,
    group: Group | None,
) -> ResumeReport:
    """Restore a sharded checkpoint into ``items`` (collective when ``group`` is given;
    in one process without torch.distributed otherwise)."""
    path = str(store.manifest_path(step))
    sharded = parse(manifest, path)
    saved_world = sharded.world_size
    rank, world = (group.rank, group.world) if group is not None else (0, 1)
    kinds = manifest.get("items", {})
    stateful = {name for name, kind in kinds.items() if kind in (STATE, GENERATOR)}
    missing = tuple(sorted(stateful - set(items)))
    unexpected = tuple(sorted(set(items) - stateful))
    if strict and (missing or unexpected):
        raise RestoreMismatchError(
            _mismatch(path, missing, unexpected), missing=missing, unexpected=unexpected, path=path
        )
    _check_ranks(sharded.paths, saved_world, path)
    same_world = saved_world == world
    modules = {
        n: t for n, t in items.items() if n in stateful and isinstance(t, nn.Module)
    }  # fmt: skip
    optimizers = {
        n: t for n, t in items.items() if n in stateful and isinstance(t, torch.optim.Optimizer)
    }
    for name, optimizer in optimizers.items():
        owner(optimizer, modules, name)  # before anything is read or changed
    template: dict[str, Any] = {name: get_model_state_dict(m) for name, m in modules.items()}
    unstepped = {n for n in optimizers if not _has_state(sharded.paths, n)}
    for name, optimizer in optimizers.items():
        template[name] = get_optimizer_state_dict(owner(optimizer, modules, name), optimizer)
        if name in unstepped:  # saved before its first step: only its hyper-parameters
            template[name] = {"param_groups": template[name]["param_groups"]}
    rest_names = [n for n in kinds if n not in template]
    under: list[tuple[str | int, ...]] = [(ITEMS, n) for n in rest_names]
    if same_world:
        under.append((RANKS, rank_key(rank)))
    rest = load_state(store, manifest, path, map_location, under=under, sharded=sharded)
    assert isinstance(rest, dict)
    saved_items = rest.get(ITEMS, {})
    for name, target in items.items():  # every target checked before any is changed
        if name in stateful and name not in template:
            kind = kinds.get(name)
            saved = _mine(rest, rank, name) if kind == GENERATOR else saved_items.get(name)
            if kind == GENERATOR and saved is None:
                continue  # another world size: per-rank generators are not restored
            _check_target(name, kind, target, saved, path)
    if template:
        reader = StorageReader(str(store.root), step)
        if group is not None:
            dcp_load({ITEMS: template}, storage_reader=reader, process_group=group.pg)
        else:
            dcp_load({ITEMS: template}, storage_reader=reader, no_dist=True)
    restored = []
    for name, target in items.items():
        if name not in stateful:
            continue
        if name in modules:
            set_model_state_dict(target, template[name])
        elif name in optimizers:
            loaded = {"state": {}, **template[name]}
            set_optimizer_state_dict(owner(target, modules, name), target, loaded)
            if name in unstepped:
                target.state.clear()  # as it was saved: not stepped yet
        elif kinds.get(name) == GENERATOR:
            saved = _mine(rest, rank, name)
            if saved is None:
                continue
            _rng.set_generator(target, saved, name, path)
        else:
            target.load_state_dict(saved_items[name])
        restored.append(name)
    rng: tuple[str, ...] = ()
    if same_world:
        mine = rest.get(RANKS, {}).get(rank_key(rank), {})
        rng = _rng.restore(mine.get("rng", {}), path)
    else:
        warnings.warn(
            f"{path} was saved on {saved_world} rank(s) and is restored on {world}: tensors "
            "were resharded, but the per-rank random generators (and torch.Generator items) "
            "have no counterpart and were not restored.",
            stacklevel=3,
        )
    return ResumeReport(
        step=step,
        restored=tuple(restored),
        values={n: saved_items[n] for n in kinds if n not in stateful and n in saved_items},
        missing=missing,
        unexpected=unexpected,
        rng=rng,
        metrics=metrics_of(manifest, path),
        metadata=dict(manifest.get("metadata", {})),
        created=manifest.get("created"),
        versions=dict(manifest.get("versions", {})),
        resharded_from=None if same_world else saved_world,
    )


def whole_loader(items: Mapping[str, Any]) -> Any:
    """For ``_readers.restore`` of a checkpoint saved by one process onto ranks whose
    modules are sharded (FSDP2, DTensor parameters): each rank holds the whole state, and
    ``set_*_state_dict(full_state_dict=True)`` keeps its shards; the optimizer's state,
    saved keyed by parameter index, is keyed by name first. Other items load as in one
    process (``load_into``, ``load_state_dict``)."""
    modules = {name: item for name, item in items.items() if isinstance(item, nn.Module)}
    whole = StateDictOptions(full_state_dict=True)

    def load(name: str, target: Any, saved: Any) -> bool:
        if isinstance(target, nn.Module) and _sharded(target):
            set_model_state_dict(target, dict(saved), options=whole)
            return True
        if isinstance(target, torch.optim.Optimizer):
            model = owner(target, modules, name)
            if _sharded(model):
                named = _by_name(saved, get_optimizer_state_dict(model, target))
                set_optimizer_state_dict(model, target, named, options=whole)
                if not named["state"]:
                    target.state.clear()  # saved before its first step
                return True
        return False

    return load


def _sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def _by_name(saved: Any, current: dict[str, Any]) -> dict[str, Any]:
    """An optimizer ``state_dict()`` keyed by parameter index, keyed by parameter name in the
    order the target optimizer holds its parameters (the order the indices count)."""
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    if not isinstance(groups, list) or len(groups) != len(current["param_groups"]):
        raise ValueError(
            "the saved optimizer has another number of parameter groups than the target's"
        )
    names: dict[object, str] = {}
    for group, target_group in zip(groups, current["param_groups"], strict=True):
        if len(group["params"]) != len(target_group["params"]):
            raise ValueError("a saved parameter group holds another number of parameters")
        names.update(zip(group["params"], target_group["params"], strict=True))
    return {
        "state": {names.get(k, k): v for k, v in saved.get("state", {}).items()},
        "param_groups": [
            {**group, "params": [names.get(p, p) for p in group["params"]]} for group in groups
        ],
    }


def _mine(rest: dict[str, Any], rank: int, name: str) -> object:
    return rest.get(RANKS, {}).get(rank_key(rank), {}).get("generators", {}).get(name)


def _has_state(paths: Any, name: str) -> bool:
    """Whether optimizer item ``name`` was saved with per-parameter state."""
    prefix = (ITEMS, name, "state")
    return paths is None or any(tuple(p[:3]) == prefix for p in paths.values())


def _check_ranks(paths: Any, world: int, path: str) -> None:
    """A manager's checkpoint holds the per-rank state of exactly ``world_size`` ranks."""
    if paths is None:
        return
    ranks = {parts[1] for parts in paths.values() if len(parts) > 1 and parts[0] == RANKS}
    if ranks and ranks != {rank_key(r) for r in range(world)}:
        raise CorruptCheckpointError(
            f"{path}: it says {world} rank(s) saved it but holds the state of "
            f"{len(ranks)} ({sorted(map(str, ranks))[:8]}); the manifest is damaged",
            path=path,
        )
