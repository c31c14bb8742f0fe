"""Run under torchrun by tests/test_distributed.py: one FSDP training step of a smoke MoE whose experts do
not divide by the world (3 experts), measured on each rank, and the same step on one unsharded copy.

Writes <out>/rank<R>.json: the bytes of this rank's shards (parameters, gradients, optimizer state)
and of the whole, what memory_plan planned for them, and the largest difference between the
sharded step's parameters and the unsharded step's.
"""

import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import llm


def local_bytes(tensors):
    return sum((t.to_local() if llm.is_sharded(t) else t).numel() * t.element_size() for t in tensors)


def step(model, cfg, x, y):
    optimizers = llm.make_optimizers(model, cfg, sharded=llm.sharded_muon)
    torch.manual_seed(2)  # the same router noise for both steps
    ce, lb, z = model(x, targets=y)
    (ce + cfg.balance_loss_weight * lb + cfg.z_loss_weight * z).backward()
    grads = local_bytes([p.grad for p in model.parameters()])
    for o in optimizers:
        o.step()
    state = local_bytes([v for o in optimizers for s in o.state.values() for v in s.values() if torch.is_tensor(v)
                         and v.dim() > 0])
    return grads, state


def skipped_step(model, cfg, x, y, rank):
    """A step whose gradient on rank 1 holds a NaN: the global norm is NaN on every rank, and every
    rank leaves its parameters as they were. -> the largest change of this rank's parameters."""
    optimizers = llm.make_optimizers(model, cfg, sharded=llm.sharded_muon)
    before = [p.to_local().clone() for p in model.parameters()]
    ce, lb, z = model(x, targets=y)
    (ce + cfg.balance_loss_weight * lb + cfg.z_loss_weight * z).backward()
    if rank == 1:
        next(model.parameters()).grad.to_local().view(-1)[0] = float("nan")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    ok = torch.isfinite(norm.full_tensor())
    muon, adamw = optimizers
    muon.step(ok=ok)
    adamw.found_inf = (~ok).float()
    adamw.step()
    return max((p.to_local() - b).abs().max().item() if b.numel() else 0.0
               for p, b in zip(model.parameters(), before))


def main(out):
    cfg = llm.Config(**{**llm.PRESETS["smoke"], "vocab_size": 512, "num_experts": 3, "balance": "aux_free",
                        "n_shared_experts": 1, "parallel": "fsdp"}).validate()
    runtime = llm.make_runtime(cfg)
    torch.manual_seed(0)
    whole = llm.Transformer(cfg)
    model = llm.shard_model(copy.deepcopy(whole), runtime)
    torch.manual_seed(1)  # every rank the same batch: the unsharded step sees what the sharded ones sum
    x, y = torch.randint(0, 512, (2, cfg.max_seq_len)), torch.randint(0, 512, (2, cfg.max_seq_len))
    params = local_bytes(model.parameters())
    calls, real = [], llm.newton_schulz  # Newton-Schulz on this rank: the matrices of each call

    def counted(G, *args, **kwargs):
        calls.append(G.numel() // (G.shape[-2] * G.shape[-1]) if G.dim() >= 2 else 0)
        return real(G, *args, **kwargs)

    llm.newton_schulz = counted
    grads, state = step(model, cfg, x, y)
    llm.newton_schulz = real
    step(whole, cfg, x, y)
    after = llm.full_state(model.state_dict(), keep=True)
    difference = max((after[k] - v).abs().max().item() for k, v in whole.state_dict().items())
    plan = llm.memory_plan(cfg, runtime.world)
    report = {"params": params, "grads": grads, "optimizer": state, "whole_params": 4 * sum(
        p.numel() for p in whole.parameters()), "plan": {"weights": plan.weights, "grads": plan.grads,
                                                         "optimizer": plan.optimizer},
        "local_experts": model.blocks[0].ffn.w_up.to_local().shape[0], "max_difference": difference,
        "orthogonalised": sum(calls), "matrices": sum(p.numel() // (p.shape[-2] * p.shape[-1])
                                                      for p in llm.optimizer_split(whole)[0]),
        "skipped_change": skipped_step(model, cfg, x, y, runtime.rank)}
    with open(os.path.join(out, f"rank{runtime.rank}.json"), "w") as f:
        json.dump(report, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
