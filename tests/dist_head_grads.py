"""Run under torchrun by tests/test_distributed_heads.py: a trainable head wrapped with its model by
`finish_model` gets, on every rank, the gradient of the whole batch, with no hand all-reduce.

Each rank computes the reward loss on its half of a fixed batch through the DDP/FSDP-wrapped
`WithHead`; the reference is the full batch through unwrapped copies, in one process."""
import copy
import sys

import torch

from minitune import build_model
from minitune.distributed import cleanup, full_tensor, init_distributed
from minitune.lora import LoRAConfig, apply_lora
from minitune.model import ModelConfig
from minitune.reward import RewardHead, sequence_rewards
from minitune.train.sections import ModelSection, Parallel, RunSection
from minitune.train.setup import finish_model


def summing(reduce_scatter):
    def call(*args, **kwargs):
        kwargs["op"] = torch.distributed.ReduceOp.SUM
        return reduce_scatter(*args, **kwargs)
    return call


parallel = Parallel(sys.argv[1])
if "avg-sums" in sys.argv[2:]:  # play gloo as torch 2.7 had it: an AVG reduce-scatter returns the sum (pytorch#162338)
    for name in ("reduce_scatter_tensor", "reduce_scatter_single"):  # older FSDP2 calls the first, torch 2.13 the second
        if hasattr(torch.distributed, name):
            setattr(torch.distributed, name, summing(getattr(torch.distributed, name)))
info = init_distributed(torch.device("cpu"))
cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
base = build_model(cfg, seed=0)
for p in base.parameters():
    p.requires_grad_(False)
torch.manual_seed(1)  # the same adapter and head on every rank (DDP would broadcast rank 0's anyway)
apply_lora(base, LoRAConfig(r=4, alpha=8, dropout=0.0), "reward")
with torch.no_grad():  # B != 0 so every LoRA weight gets a gradient
    for n, p in base.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.1)
head = RewardHead(32)
ref_base, ref_head = copy.deepcopy(base), copy.deepcopy(head)

g = torch.Generator().manual_seed(2)
ids = torch.randint(3, 64, (8, 12), generator=g)
mask = torch.ones_like(ids)
mask[::3, :4] = 0  # some left padding
targets = torch.randn(8, generator=g)

((sequence_rewards(ref_base, ref_head, ids, mask) - targets) ** 2).mean().backward()
expected = {f"model.{n}": p.grad for n, p in ref_base.named_parameters() if p.requires_grad}
expected |= {f"head.{n}": p.grad for n, p in ref_head.named_parameters()}

model = finish_model(base, ModelSection(), RunSection(parallel=parallel), info, head=head)
rows = slice(info.rank, None, info.world_size)
((sequence_rewards(model, None, ids[rows], mask[rows]) - targets[rows]) ** 2).mean().backward()
got = {n.removeprefix("module."): full_tensor(p.grad) for n, p in model.named_parameters() if p.requires_grad}
assert got.keys() == expected.keys(), sorted(set(got) ^ set(expected))[:4]
worst = max((got[n] - expected[n]).abs().max().item() for n in got)
assert worst < 1e-5, f"rank {info.rank}: gradients differ from the full batch's by {worst}"
assert got["head.score.weight"].abs().sum() > 0
print(f"rank {info.rank} {parallel.value}: {len(got)} gradients equal the full batch's (max diff {worst:.1e})")
cleanup(model)  # releases the DDP reducer before the group (a bare destroy_process_group can abort at exit)
