"""A tiny autoregressive language model as the DPO policy (the earlier setting, kept as a check).

A one-layer GRU over 16 tokens (token 0 ends a response, at most 6 tokens), pretrained on a
random Markov source to give ``π_ref``; pairs are two samples of ``π_ref`` labelled by
Bradley–Terry on a hidden token + bigram reward, so a response can be chosen in one pair and
rejected in another. ``E_π[r*]`` and KL are Monte Carlo estimates on sequences sampled from the
policy; the mass outside the training responses is exact.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import Tensor

from balancer.recipes.dpo import dpo_metrics, sequence_logprobs


@dataclasses.dataclass(frozen=True)
class Autoregressive:
    prompts: int = 4
    vocab: int = 16  # token 0 ends a response
    length: int = 6
    hidden: int = 64
    pretrain_steps: int = 150
    pretrain_batch: int = 128
    pairs: int = 1024
    steps: int = 300
    batch: int = 64
    lr: float = 1e-3
    eval_every: int = 25
    mc_samples: int = 256  # per prompt, for E_π[r*] and KL


class TinyLM(torch.nn.Module):
    def __init__(self, prompts: int, vocab: int, hidden: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.embed = torch.nn.Embedding(vocab + prompts, 32)  # ids >= vocab: the prompt tokens
        self.gru = torch.nn.GRU(32, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, prompt: Tensor, tokens: Tensor) -> Tensor:
        """Logits ``[B, T, V]``: position t predicts ``tokens[:, t]`` from the prompt and ``tokens[:, :t]``."""
        inputs = torch.cat([self.vocab + prompt[:, None], tokens[:, :-1]], dim=1)
        return self.head(self.gru(self.embed(inputs))[0])

    @torch.no_grad()
    def sample(self, prompt: Tensor, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        tokens, h, last = [], None, self.vocab + prompt
        for _ in range(length):
            out, h = self.gru(self.embed(last)[:, None], h)
            last = torch.multinomial(self.head(out[:, 0]).softmax(-1), 1, generator=gen)[:, 0]
            tokens.append(last)
        return _close(torch.stack(tokens, dim=1))


def _close(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Zeroes everything after the first end token; the mask counts tokens up to and including it."""
    end = tokens == 0
    mask = (end.long().cumsum(1) - end.long()) == 0
    return torch.where(mask, tokens, 0), mask


def _markov_source(cfg: Autoregressive, gen: torch.Generator, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pretraining data: per-prompt start logits, shared bigram logits, an end token ever likelier."""
    start = torch.randn(cfg.prompts, cfg.vocab, generator=gen) * 2.0
    start[:, 0] = -math.inf
    trans = torch.randn(cfg.vocab, cfg.vocab, generator=gen) * 2.0
    prompt = torch.randint(cfg.prompts, (n,), generator=gen)
    tokens = [torch.multinomial(start[prompt].softmax(-1), 1, generator=gen)[:, 0]]
    for t in range(1, cfg.length):
        logits = trans[tokens[-1]].clone()
        logits[:, 0] = -2.0 + 1.0 * t
        tokens.append(torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0])
    return prompt, *_close(torch.stack(tokens, dim=1))


class AutoregressiveTask:
    def __init__(self, cfg: Autoregressive, seed: int, beta: float) -> None:
        self.beta = beta
        self.cfg = cfg
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.model = TinyLM(cfg.prompts, cfg.vocab, cfg.hidden)
        self._pretrain(gen)
        self.ref = copy.deepcopy(self.model).requires_grad_(False)
        self.token_reward = torch.randn(cfg.prompts, cfg.vocab, generator=gen)
        self.bigram_reward = torch.randn(cfg.vocab, cfg.vocab, generator=gen) * 0.5
        x = torch.arange(cfg.pairs) % cfg.prompts
        (ya, ma), (yb, mb) = (self.ref.sample(x, cfg.length, gen) for _ in range(2))
        a_wins = torch.rand(cfg.pairs, generator=gen) < torch.sigmoid(self.reward(x, ya, ma) - self.reward(x, yb, mb))
        pick = a_wins[:, None]
        self.x = x
        self.yw, self.mw = torch.where(pick, ya, yb), torch.where(pick, ma, mb)
        self.yl, self.ml = torch.where(pick, yb, ya), torch.where(pick, mb, ma)
        with torch.no_grad():
            self.ref_w, self.ref_l = (
                self._logp(self.ref, x, self.yw, self.mw),
                self._logp(self.ref, x, self.yl, self.ml),
            )
        seen = torch.cat([torch.cat([x, x])[:, None], torch.cat([self.yw, self.yl])], dim=1)
        self.distinct = torch.unique(seen, dim=0)  # the training responses, per prompt
        chosen = torch.unique(torch.cat([x[:, None], self.yw], dim=1), dim=0)
        rejected = {tuple(r) for r in torch.cat([x[:, None], self.yl], dim=1).tolist()}
        self.chosen_overlap = sum(tuple(r) in rejected for r in chosen.tolist()) / chosen.shape[0]
        self.params = list(self.model.parameters())

    def _pretrain(self, gen: torch.Generator) -> None:
        cfg = self.cfg
        prompt, tokens, mask = _markov_source(cfg, gen, cfg.pretrain_steps * cfg.pretrain_batch)
        adam = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        for i in range(cfg.pretrain_steps):
            rows = slice(i * cfg.pretrain_batch, (i + 1) * cfg.pretrain_batch)
            nll = -self._logp(self.model, prompt[rows], tokens[rows], mask[rows]).mean()
            adam.zero_grad()
            nll.backward()
            adam.step()
        adam.zero_grad()  # a stale .grad would join the first Balancer step as an ungrouped gradient

    @staticmethod
    def _logp(model: TinyLM, prompt: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        return sequence_logprobs(model(prompt, tokens), tokens, mask)

    def reward(self, prompt: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        content = mask & (tokens != 0)
        unigram = torch.where(content, self.token_reward[prompt[:, None], tokens], 0.0).sum(1)
        pairs = content[:, 1:] & content[:, :-1]
        bigram = torch.where(pairs, self.bigram_reward[tokens[:, :-1], tokens[:, 1:]], 0.0).sum(1)
        return unigram + bigram

    def pair_logps(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([self.x[idx], self.x[idx]])
        logp = self._logp(
            self.model, x, torch.cat([self.yw[idx], self.yl[idx]]), torch.cat([self.mw[idx], self.ml[idx]])
        )
        return logp[: idx.shape[0]], logp[idx.shape[0] :]

    @torch.no_grad()
    def evaluate(self, step: int = 0) -> dict[str, float]:
        cfg = self.cfg
        lw = self._logp(self.model, self.x, self.yw, self.mw)
        ll = self._logp(self.model, self.x, self.yl, self.ml)
        m = dpo_metrics(lw, ll, self.ref_w, self.ref_l, beta=self.beta)
        in_mass = torch.zeros(cfg.prompts).index_add_(
            0, self.distinct[:, 0], self._logp(self.model, self.distinct[:, 0], *_close(self.distinct[:, 1:])).exp()
        )
        gen = torch.Generator().manual_seed(10_000 * self.seed + step)
        prompt = torch.arange(cfg.prompts).repeat_interleave(cfg.mc_samples)
        tokens, mask = self.model.sample(prompt, cfg.length, gen)
        log_ratio = self._logp(self.model, prompt, tokens, mask) - self._logp(self.ref, prompt, tokens, mask)
        return {
            "logp_chosen": m["logp_chosen"].item(),
            "logp_rejected": m["logp_rejected"].item(),
            "reward_margin": m["reward_margin"].item(),
            "reward_accuracy": m["reward_accuracy"].item(),
            "ood_mass": (1.0 - in_mass).mean().item(),
            "expected_reward": self.reward(prompt, tokens, mask).mean().item(),
            "kl": log_ratio.mean().item(),
        }
