"""Run under torchrun by tests/test_distributed_heads.py: generation on a DDP- or FSDP2-wrapped model where
the ranks' answers end at different steps. An FSDP2 forward all-gathers parameters with every rank, so a
rank that stops decoding early leaves the others waiting in their next all-gather forever (seen before
`generate` kept sharded ranks in step: the run hung). Two cases: rank 0's answers end at their first token
while rank 1's end between a few tokens and the budget (so it drops finished rows); and rank 0 has a smaller
budget than rank 1 (the RL recipes draw each rank's budget from [gen.min_new_tokens, gen.max_new_tokens]).
Each rank's tokens must equal the unwrapped model's for its own prompts, and under FSDP2 both ranks must
run as many forwards.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_generate.py fsdp"""
import copy
import sys

import torch

from helpers import lora_generation_model
from minitune.distributed import all_reduce_max, cleanup, init_distributed
from minitune.generate import generate
from minitune.train.sections import ModelSection, Parallel, RunSection
from minitune.train.setup import finish_model

parallel = Parallel(sys.argv[1])
info = init_distributed(torch.device("cpu"))
torch.manual_seed(0)  # the same adapter on every rank, as the recipes' seeding gives
base = lora_generation_model()
for name, p in base.named_parameters():
    p.requires_grad_("lora_" in name)
plain = copy.deepcopy(base)
ids = torch.randint(3, 96, (6, 5), generator=torch.Generator().manual_seed(info.rank))
# rank 1: the 12th token of its first greedy answer ends an answer, so its rows end at different steps
free = generate(plain, ids, max_new_tokens=40)
cases = {"rank 0's answers end at once": (list(range(96)) if info.rank == 0 else [int(free.tokens[0, 11])], 40),
         "rank 0's budget is 10 tokens": ([] if info.rank == 0 else [int(free.tokens[0, 11])], 10 if info.rank == 0 else 40)}
expected = {case: generate(plain, ids, max_new_tokens=budget, eos_ids=eos) for case, (eos, budget) in cases.items()}
assert info.rank == 0 or all(e.lengths.max() > 16 > e.lengths.min() for e in expected.values())

model = finish_model(base, ModelSection(), RunSection(parallel=parallel), info)
policy = (model.module if parallel is Parallel.DDP else model).eval()  # as the recipes sample: no dropout
forwards = [0]
policy.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
for case, (eos, budget) in cases.items():
    forwards[0] = 0
    got = generate(policy, ids, max_new_tokens=budget, eos_ids=eos)  # greedy: what the held-out checks decode
    want = expected[case]
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths), (case, got.lengths, want.lengths)
    n = forwards[0]
    most, fewest = all_reduce_max(torch.tensor([n, -n])).tolist()
    if parallel is Parallel.FSDP:
        assert most == -fewest, f"rank {info.rank}, {case}: the ranks ran {-fewest} to {most} forwards"
    print(f"rank {info.rank} {parallel.value}, {case}: answers of {want.lengths.tolist()} tokens as the plain model's, "
          f"{n} forwards (ranks: {-fewest} to {most})")
model.train()
model(ids).logits.float().mean().backward()  # the collectives that follow generation still pair up
cleanup(model)
