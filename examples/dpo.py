"""DPO with ``balanced_dpo``: the chosen and rejected halves of each pair as two gradient groups.

A tiny GRU language model learns to prefer one response over another for each prompt. The DPO
loss is split exactly into a "chosen" and a "rejected" part (their gradients sum to the DPO
gradient), and ``balanced_dpo`` reweights the two before Adam steps. Runs in a few seconds::

    python examples/dpo.py            # --rule norm|prob, --steps N

The experiment behind the plugin's rules is ``examples/experiments/dpo_imbalance.py``.
"""

from __future__ import annotations

import argparse
import copy

import torch

from balancer import Balancer
from balancer.recipes.dpo import dpo_group_losses, dpo_metrics, sequence_logprobs, tap_pairs

VOCAB, PROMPTS, LENGTH = 12, 8, 5


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB + PROMPTS, 16)  # ids >= VOCAB are the prompts
        self.gru = torch.nn.GRU(16, 32, batch_first=True)
        self.head = torch.nn.Linear(32, VOCAB)

    def forward(self, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]``; position t predicts ``tokens[:, t]``."""
        inputs = torch.cat([VOCAB + prompt[:, None], tokens[:, :-1]], dim=1)
        return self.head(self.gru(self.embed(inputs))[0])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rule", choices=["norm", "prob"], default="norm")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    policy = TinyLM()
    reference = copy.deepcopy(policy).requires_grad_(False)
    prompts = torch.arange(PROMPTS)
    chosen = torch.randint(VOCAB, (PROMPTS, LENGTH))  # one preferred and one dispreferred response
    rejected = torch.randint(VOCAB, (PROMPTS, LENGTH))
    with torch.no_grad():
        ref_w = sequence_logprobs(reference(prompts, chosen), chosen)
        ref_l = sequence_logprobs(reference(prompts, rejected), rejected)

    opt = Balancer(torch.optim.Adam(policy.parameters(), lr=1e-2), plugins=[("balanced_dpo", {"rule": args.rule})])
    for _ in range(args.steps):
        logp_w = sequence_logprobs(policy(prompts, chosen), chosen)
        logp_l = sequence_logprobs(policy(prompts, rejected), rejected)
        logp_w, logp_l = tap_pairs(opt, logp_w, logp_l)  # the "prob" rule acts at these taps
        opt.backward(dpo_group_losses(logp_w, logp_l, ref_w, ref_l, beta=0.1))  # chosen + rejected
        opt.step()
        opt.zero_grad()

    stats = opt.last_stats
    print("groups", stats.names, "norms", stats.norms.tolist(), "weights", stats.weights.tolist())
    with torch.no_grad():
        logp_w = sequence_logprobs(policy(prompts, chosen), chosen)
        logp_l = sequence_logprobs(policy(prompts, rejected), rejected)
        metrics = {k: float(v) for k, v in dpo_metrics(logp_w, logp_l, ref_w, ref_l, beta=0.1).items()}
    print(metrics)
    return metrics


if __name__ == "__main__":
    main()
