"""Run under torchrun by tests/test_distributed_heads.py: GRPO's loss on each rank's share of a minibatch,
divided by the global minibatch's counts (`minitune.grpo.global_counts`), gives through DDP/FSDP2 the
gradient one process computes for the whole minibatch, even where the ranks hold different numbers of
trained tokens (rank 1's first group scored alike: weight 0). The logged update statistics (clip shares, KL,
ratio: `minitune.grpo.global_token_means`) equal the one process's too.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_grpo_grads.py ddp token [local]

With `local` each rank divides by its own counts (the mean of the ranks' means): the script then prints
how far that is from the full batch's gradient (and rank 0's own statistics from the full batch's) instead of
asserting, so the test can show it differs."""
import copy
import sys

import torch

from minitune import build_model
from minitune.distributed import cleanup, full_tensor, init_distributed
from minitune.grpo import Aggregation, global_counts, global_token_means, grpo_loss
from minitune.lora import LoRAConfig, apply_lora
from minitune.model import ModelConfig
from minitune.ppo import logprobs_from_logits
from minitune.train.sections import ModelSection, Parallel, RunSection
from minitune.train.setup import finish_model


def logprobs(model, ids):
    return logprobs_from_logits(model(ids).logits[:, :-1], ids[:, 1:])


parallel, how, local = Parallel(sys.argv[1]), Aggregation(sys.argv[2]), "local" in sys.argv[3:]
info = init_distributed(torch.device("cpu"))
assert info.world_size == 2, "the fixed minibatch below is split over 2 ranks"
cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
base = build_model(cfg, seed=0)
for p in base.parameters():
    p.requires_grad_(False)
torch.manual_seed(1)
apply_lora(base, LoRAConfig(r=4, alpha=8, dropout=0.0), "policy")
with torch.no_grad():  # B != 0 so every LoRA weight gets a gradient
    for n, p in base.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.1)
reference = copy.deepcopy(base)

# 8 answers in groups of 2: rows 0-3 on rank 0, rows 4-7 on rank 1; answers of different lengths.
g = torch.Generator().manual_seed(2)
ids = torch.randint(3, 64, (8, 12), generator=g)
mask = torch.zeros(8, 11)
for row, length in enumerate([6, 3, 7, 5, 4, 7, 2, 6]):
    mask[row, 4:4 + length] = 1
advantages = torch.randn(8, generator=g)
# the rollout policy's and the reference's log-probs, off the policy's by fixed amounts: ratios clip both ways, KL > 0
old_shift, ref_shift = 0.4 * torch.randn(8, 11, generator=g), 0.3 * torch.randn(8, 11, generator=g)
loss_args = dict(aggregation=how, beta=0.1)
weight = torch.tensor([1.0, 1, 1, 1, 0, 0, 1, 1])  # rank 1's first group scored alike: trained nowhere
rmask = mask * weight[:, None]

logp = logprobs(reference, ids)
# one process, the whole minibatch: its trained tokens, and its trained answers (6: the recipe's count, `row_weight.sum()`)
loss, full_stats = grpo_loss(logp, logp.detach() + old_shift, advantages, rmask, ref_logp=logp.detach() + ref_shift,
                             total_sequences=float(weight.sum()), **loss_args)
loss.backward()
expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
expected_stats = {k: getattr(full_stats, k).item() for k in ("clip_low", "clip_high", "kl", "ratio")}
assert 0 < expected_stats["clip_low"] < 1 and 0 < expected_stats["clip_high"] < 1, expected_stats

model = finish_model(base, ModelSection(), RunSection(parallel=parallel), info)
rows = slice(4 * info.rank, 4 * info.rank + 4)
tokens, sequences = ((float(rmask[rows].sum()), float(weight[rows].sum())) if local
                     else global_counts(rmask[rows], weight[rows]))
logp = logprobs(model, ids[rows])
loss, stats = grpo_loss(logp, logp.detach() + old_shift[rows], advantages[rows], rmask[rows],
                        ref_logp=logp.detach() + ref_shift[rows], total_tokens=tokens, total_sequences=sequences,
                        **loss_args)
loss.backward()
logged = ({k: getattr(stats, k).item() for k in expected_stats} if local
          else global_token_means([stats], [rmask[rows].sum()]))
stats_off = max(abs(logged[k] - expected_stats[k]) for k in expected_stats)
got = {n.removeprefix("module."): full_tensor(p.grad) for n, p in model.named_parameters() if p.requires_grad}
assert got.keys() == expected.keys(), sorted(set(got) ^ set(expected))[:4]
worst = max((got[n] - expected[n]).abs().max().item() for n in got)
scale = max(p.abs().max().item() for p in expected.values())
if local:
    print(f"rank {info.rank} {parallel.value} {how.value} local counts: max diff {worst:.3e} (largest gradient {scale:.3e}); "
          f"own statistics off by {stats_off:.3e}")
else:
    assert worst < 1e-6 * max(1.0, scale) + 1e-7, f"rank {info.rank}: gradients differ from the full batch's by {worst}"
    assert stats_off < 1e-6, f"rank {info.rank}: logged statistics {logged} are not the full batch's {expected_stats}"
    print(f"rank {info.rank} {parallel.value} {how.value}: {len(got)} gradients equal the full batch's (max diff {worst:.1e}), "
          f"statistics too (max diff {stats_off:.1e})")
cleanup(model)
