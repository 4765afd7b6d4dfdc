"""Resuming a ZeRO 1-3 checkpoint with another world size.

Each process saves, beside its partitions, where every parameter's pieces lie in them: a list
of fragments (parameter name, offset in the parameter, partition index, offset in the
partition, length), read from the live engine. With another world size, each new process reads
every old process's partitions, puts each parameter together from its pieces, and cuts out its
own pieces by its own live layout: the fp32 master weights, every optimizer-state tensor shaped
like a partition, and the averaged weights. Scalars (step counts, hyperparameters, the loss
scaler) come from old rank 0. Each process holds one full fp32 copy of that state while loading.
"""

from __future__ import annotations

import torch

Fragment = tuple[str, int, int, int, int]  # name, offset in the parameter, partition, offset in it, numel
FP32_KEY = {1: "single_partition_of_fp32_groups", 2: "single_partition_of_fp32_groups", 3: "fp32_flat_groups"}
OPTIM_KEY = {1: "base_optimizer_state", 2: "base_optimizer_state", 3: "optimizer_state_dict"}


def master_fragments(module, opt, stage: int, rank: int) -> list[Fragment]:
    """Where each parameter's pieces lie in this process's fp32 master partitions."""
    names = {id(p): n for n, p in module.named_parameters()}
    out = []
    if stage in (1, 2):
        for i, group in enumerate(opt.bit16_groups):
            for p in group:
                m = getattr(p, "_hp_mapping", None)
                if m is not None:
                    out.append((names[id(p)], m.lp_fragment_address.start, i, m.hp_fragment_address.start,
                                m.hp_fragment_address.numel))
        return out
    for i, group in enumerate(opt.fp16_groups):
        offset = 0
        for p in group:
            part = p.ds_tensor.ds_numel
            start = rank * part
            if p.ds_numel > start:
                out.append((names[id(p)], start, i, offset, min(part, p.ds_numel - start)))
            offset += part
    return out


def averaged_fragments(module, stage: int, rank: int, master: list[Fragment]) -> list[Fragment]:
    """Where each parameter's pieces lie in the averaged tensors (framework/averaging/views.py)."""
    if stage in (1, 2):
        return master  # the averages are copies of the master partitions
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    out = []
    for j, (name, p) in enumerate(trainable):
        part = p.ds_tensor.ds_numel
        if p.ds_numel > rank * part:
            out.append((name, rank * part, j, 0, min(part, p.ds_numel - rank * part)))
    return out


def optimizer_partition_order(opt, stage: int) -> list[int]:
    """Partition index of each entry of the base optimizer's state (its parameter numbering)."""
    if stage in (1, 2):
        return list(range(len(opt.bit16_groups)))
    owner = opt.sub_group_to_group_id
    return [s for g in range(len(opt.optimizer.param_groups)) for s in sorted(owner) if owner[s] == g]


def assemble(pieces: list[tuple[list[Fragment], list[torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Whole flat parameters from every old process's (fragments, partitions)."""
    found: dict[str, dict[int, torch.Tensor]] = {}
    for fragments, parts in pieces:
        for name, p_off, idx, t_off, n in fragments:
            found.setdefault(name, {})[p_off] = parts[idx].flatten()[t_off:t_off + n]
    return {name: torch.cat([by_off[k] for k in sorted(by_off)]) for name, by_off in found.items()}


def cut(full: dict[str, torch.Tensor], fragments: list[Fragment], sizes: list[int]) -> list[torch.Tensor]:
    """This process's partitions (zero padding) from whole flat parameters."""
    out = [torch.zeros(n, dtype=torch.float32) for n in sizes]
    for name, p_off, idx, t_off, n in fragments:
        out[idx][t_off:t_off + n] = full[name][p_off:p_off + n]
    return out


def reshard(old: list[dict], live: dict, stage: int, layout: dict, averaged_sizes: list[int]) -> dict:
    """One process's saved state in the new layout. `old`: every old process's saved state;
    `live`: this process's fresh ZeroState.state_dict(); `layout`: its fragments and sizes."""
    fp32_key, optim_key = FP32_KEY[stage], OPTIM_KEY[stage]
    zero = dict(live["optimizer"])
    first = old[0]["optimizer"]
    for key in ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad"):
        if key in first:
            zero[key] = first[key]
    masters = [(s["layout"]["master"], s["optimizer"][fp32_key]) for s in old]
    zero[fp32_key] = cut(assemble(masters), layout["master"], layout["master_sizes"])

    old_optim, new_order = first[optim_key], layout["optim_order"]
    state = {}
    for k, entry in old_optim["state"].items():
        state[k] = {}
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() == 1:  # partition-shaped (a flat partition's state); steps are 0-dim
                pieces = [(s["layout"]["master"], _by_partition(s, optim_key, key, s["layout"]["optim_order"])) for s in old]
                state[k][key] = cut(assemble(pieces), layout["master"], layout["master_sizes"])[new_order[k]]
            else:
                state[k][key] = value
    zero[optim_key] = {"state": state, "param_groups": [
        {**g_old, "params": g_new["params"]} for g_old, g_new in zip(old_optim["param_groups"],
                                                                      live["optimizer"][optim_key]["param_groups"], strict=True)]}

    resharded = {**old[0], "optimizer": zero}  # buffers, counters, scheduler, BN sources: replicated, rank 0's
    resharded["averager"] = {}
    for name, first_state in (old[0].get("averager") or {}).items():  # each averager's partitions, by name
        count = len(first_state["tensors"])
        tensors = [(s["layout"]["averaged"], [s["averager"][name]["tensors"][f"t{i}"] for i in range(count)]) for s in old]
        new = cut(assemble(tensors), layout["averaged"], averaged_sizes)
        resharded["averager"][name] = {**first_state, "tensors": {f"t{i}": t for i, t in enumerate(new)}}
    return resharded


def _by_partition(saved: dict, optim_key: str, key: str, order: list[int]) -> list[torch.Tensor]:
    """An old process's optimizer-state tensors for `key`, indexed by partition."""
    state = saved["optimizer"][optim_key]["state"]
    parts: list[torch.Tensor | None] = [None] * len(order)
    for k, entry in state.items():
        parts[order[k]] = entry[key]
    return parts
