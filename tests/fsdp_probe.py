"""Run under torchrun by tests/test_fsdp.py: one FSDP training step of a smoke MoE whose experts do
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
    optimizers = llm.make_optimizers(model, cfg)
    torch.manual_seed(2)  # the same router noise for both steps
    ce, lb, z = model(x, targets=y)
    (ce + cfg.balance_loss_weight * lb + cfg.z_loss_weight * z).backward()
    grads = local_bytes([p.grad for p in model.parameters()])
    for o in optimizers:
        o.step()
    state = local_bytes([v for o in optimizers for s in o.state.values() for v in s.values() if torch.is_tensor(v)
                         and v.dim() > 0])
    return grads, state


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
    grads, state = step(model, cfg, x, y)
    step(whole, cfg, x, y)
    after = llm.full_state(model.state_dict())
    difference = max((after[k] - v).abs().max().item() for k, v in whole.state_dict().items())
    plan = llm.memory_plan(cfg, runtime.world)
    report = {"params": params, "grads": grads, "optimizer": state, "whole_params": 4 * sum(
        p.numel() for p in whole.parameters()), "plan": {"weights": plan.weights, "grads": plan.grads,
                                                         "optimizer": plan.optimizer},
        "local_experts": model.blocks[0].ffn.w_up.to_local().shape[0], "max_difference": difference}
    with open(os.path.join(out, f"rank{runtime.rank}.json"), "w") as f:
        json.dump(report, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
