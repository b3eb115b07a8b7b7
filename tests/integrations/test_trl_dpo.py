"""BalancedDPOTrainer against TRL's DPOTrainer and a float64 reference (tiny Llama, CPU, nothing downloaded).

The equality tests run in float32 (``bf16=False``; TRL's configs default to bf16 autocast, under
which each group's matmuls round separately to bf16) with SGD: Adam's first steps are
``lr · sign(g)`` on entries whose gradient is rounding noise, which turns 1e-7 differences into lr.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

import transformers  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from balancer.integrations._hf_groups import TrainerSetupError  # noqa: E402
from balancer.integrations._trl_dpo import BalancedDPOTrainer  # noqa: E402
from tests.integrations.trl_fixtures import (  # noqa: E402
    common_args,
    max_relative_difference,
    preference_dataset,
    tiny_llama,
    tiny_tokenizer,
)

# TRL's configs set gradient_checkpointing=True, and TRL reads it back: transformers 5 reports both as deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning")

BETA = 0.1


@pytest.fixture(autouse=True)
def _quiet() -> None:
    transformers.logging.set_verbosity_error()


def config(out: Path, **overrides: Any) -> DPOConfig:
    fields = common_args(out, optim="sgd", learning_rate=0.5, max_grad_norm=0.3, bf16=False, beta=BETA)
    fields.update(overrides)
    return DPOConfig(**fields)


def trainer(cls: Any, out: Path, extra: dict[str, Any] | None = None, data: Any = None, **overrides: Any) -> Any:
    return cls(
        model=tiny_llama(),
        ref_model=tiny_llama(),
        args=config(out, **overrides),
        train_dataset=data if data is not None else preference_dataset(),
        processing_class=tiny_tokenizer(),
        **(extra or {}),
    )


def balanced(out: Path, plugins: Any = None, **overrides: Any) -> Any:
    return trainer(BalancedDPOTrainer, out, {"balancer": plugins}, **overrides)


def train_logs(t: Any) -> list[dict[str, float]]:
    t.train()
    return [entry for entry in t.state.log_history if "loss" in entry]


# -- with no plugin, TRL's run --------------------------------------------------------------------
@pytest.mark.parametrize(
    "loss",
    [
        {},
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
        {"loss_type": ["ipo"], "learning_rate": 0.05},
        {"loss_type": ["apo_zero", "bco_pair"]},
        {"use_weighting": True, "ld_alpha": 0.5, "f_divergence_type": "js_divergence"},
        {"precompute_ref_log_probs": True, "loss_type": ["robust"], "label_smoothing": 0.1},
    ],
    ids=["sigmoid", "sigmoid+sft", "ipo", "apo_zero+bco_pair", "wpo+ld_alpha+js", "precomputed+robust"],
)
def test_no_plugin_equals_dpo_trainer(tmp_path: Path, loss: dict[str, Any]) -> None:
    """Gradient accumulation 2, clipping at 0.3 (active), 3 steps: parameters and logged grad norms agree."""
    plain = trainer(DPOTrainer, tmp_path / "plain", **loss)
    ours = balanced(tmp_path / "ours", None, **loss)
    plain_logs, our_logs = train_logs(plain), train_logs(ours)
    assert max_relative_difference(plain.model, ours.model) <= 1e-6
    if not loss:
        assert any(entry["grad_norm"] > 0.3 for entry in plain_logs)  # the clip acted
    for a, b in zip(plain_logs, our_logs, strict=True):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["logps/chosen"] == pytest.approx(a["logps/chosen"], rel=1e-6)


def test_adamw_and_gradient_checkpointing_match_to_adam_rounding(tmp_path: Path) -> None:
    """TRL's defaults (AdamW, gradient checkpointing): the same run, to Adam's amplified rounding."""
    overrides = {"optim": "adamw_torch", "learning_rate": 1e-3, "gradient_checkpointing": True}
    plain = trainer(DPOTrainer, tmp_path / "plain", **overrides)
    ours = balanced(tmp_path / "ours", None, **overrides)
    plain_logs, our_logs = train_logs(plain), train_logs(ours)
    assert max_relative_difference(plain.model, ours.model) <= 1e-3
    assert [e["grad_norm"] for e in our_logs] == pytest.approx([e["grad_norm"] for e in plain_logs], rel=1e-4)


# -- the split against a float64 reference --------------------------------------------------------
def reference_groups(t: Any, factor: Any = None) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Chosen and rejected gradient norms of the first step, from the DPO formula in float64.

    Batch = the whole dataset (one micro-batch, one step); the policy equals the reference, so
    ``u = 0`` and ``c = β σ(0) = β/2``; ``factor(logp_w, logp_l)`` rescales the chosen side per pair.
    """
    model = tiny_llama().double()
    data = t.train_dataset

    def logp(side: str) -> torch.Tensor:
        rows = []
        for example in data:
            prompt, completion = example["prompt_ids"], example[f"{side}_ids"]
            ids = torch.tensor([prompt + completion])
            logits = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            targets = ids[0, 1:]
            token = logits.gather(-1, targets[:, None]).squeeze(-1)
            rows.append(token[len(prompt) - 1 :].sum())
        return torch.stack(rows)

    logp_w, logp_l = logp("chosen"), logp("rejected")
    c = torch.full_like(logp_w, BETA / 2)
    scale = torch.ones_like(c) if factor is None else factor(logp_w.detach(), logp_l.detach())
    params = list(model.parameters())
    grad_w = torch.autograd.grad(-(c * scale * logp_w).mean(), params, retain_graph=True)
    grad_l = torch.autograd.grad((c * logp_l).mean(), params)

    def norm(grads: Any) -> float:
        return math.sqrt(sum(float(g.pow(2).sum()) for g in grads))

    return norm(grad_w), norm(grad_l), logp_w.detach(), logp_l.detach()


def whole_batch(**overrides: Any) -> dict[str, Any]:
    return dict(per_device_train_batch_size=16, gradient_accumulation_steps=1, max_steps=1, **overrides)


def test_chosen_and_rejected_are_the_dpo_formula_groups(tmp_path: Path) -> None:
    t = balanced(tmp_path, ["balanced_dpo"], **whole_batch(max_grad_norm=1e9))
    log = train_logs(t)[0]
    norm_w, norm_l, logp_w, logp_l = reference_groups(t)
    assert log["balancer/norm/chosen"] == pytest.approx(norm_w, rel=1e-5)
    assert log["balancer/norm/rejected"] == pytest.approx(norm_l, rel=1e-5)
    assert log["balancer/balanced_dpo/logp_chosen"] == pytest.approx(float(logp_w.mean()), rel=1e-5)
    # the norm rule brings both sides to their mean norm
    mean = (norm_w + norm_l) / 2
    assert log["balancer/weight/chosen"] == pytest.approx(mean / norm_w, rel=1e-5)
    assert log["balancer/weight/rejected"] == pytest.approx(mean / norm_l, rel=1e-5)


def test_prob_rule_rescales_each_pair_at_the_sequence_log_probs(tmp_path: Path) -> None:
    clip = 3.0
    plugins = [("balanced_dpo", {"rule": "prob", "clip": clip})]
    extra = {"balancer": plugins, "split_groups": True}  # measure the rescaled groups
    t = trainer(BalancedDPOTrainer, tmp_path, extra, **whole_batch(max_grad_norm=1e9))
    log = train_logs(t)[0]

    def factor(logp_w: torch.Tensor, logp_l: torch.Tensor) -> torch.Tensor:
        return torch.exp((logp_w - logp_l).clamp(max=math.log(clip)))

    norm_w, norm_l, logp_w, logp_l = reference_groups(t, factor)
    assert log["balancer/norm/chosen"] == pytest.approx(norm_w, rel=1e-5)  # rescaled inside the backward
    assert log["balancer/norm/rejected"] == pytest.approx(norm_l, rel=1e-5)
    assert log["balancer/balanced_dpo/prob_factor"] == pytest.approx(float(factor(logp_w, logp_l).mean()), rel=1e-5)


def test_token_mean_loss_taps_token_mean_log_probs(tmp_path: Path) -> None:
    """With ``ipo`` TRL divides by the completion length: the taps see token-mean log-probs."""
    t = balanced(tmp_path, [("balanced_dpo", {"rule": "prob", "clip": 10.0})], **whole_batch(loss_type=["ipo"]))
    log = train_logs(t)[0]
    lengths_w = torch.tensor([len(e["chosen_ids"]) for e in t.train_dataset], dtype=torch.float64)
    lengths_l = torch.tensor([len(e["rejected_ids"]) for e in t.train_dataset], dtype=torch.float64)
    _, _, logp_w, logp_l = reference_groups(t)
    mean_w, mean_l = logp_w / lengths_w, logp_l / lengths_l
    assert log["balancer/balanced_dpo/logp_chosen"] == pytest.approx(float(mean_w.mean()), rel=1e-5)
    expected = torch.exp((mean_w - mean_l).clamp(max=math.log(10.0))).mean()
    assert log["balancer/balanced_dpo/prob_factor"] == pytest.approx(float(expected), rel=1e-5)


def test_sft_term_is_ungrouped(tmp_path: Path) -> None:
    """The chosen/rejected groups are the preference loss's alone: adding TRL's SFT term changes the
    update (grad_norm) and not the groups; with the preference term weighted 0 the groups are empty."""
    logs = {}
    for name, loss in {
        "dpo": {"loss_type": ["sigmoid"]},
        "dpo+sft": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]},
        "sft-only": {"loss_type": ["sigmoid", "sft"], "loss_weights": [0.0, 1.0]},
    }.items():
        logs[name] = train_logs(balanced(tmp_path / name, None, **whole_batch(max_grad_norm=1e9, **loss)))[0]
    for side in ("chosen", "rejected"):
        key = f"balancer/norm/{side}"
        assert logs["dpo+sft"][key] == pytest.approx(logs["dpo"][key], rel=1e-5)
        assert logs["sft-only"][key] <= 1e-6 * logs["sft-only"]["grad_norm"]
    assert logs["dpo+sft"]["grad_norm"] > 2 * logs["dpo"]["grad_norm"]


def test_tap_only_rule_takes_one_backward_pass(tmp_path: Path) -> None:
    """rule='prob' acts at the taps: without groups (the default) the update is the split run's, and the
    group norms are not measured, so not logged."""
    prob = [("balanced_dpo", {"rule": "prob"})]
    one_pass = balanced(tmp_path / "one", prob)
    split = trainer(BalancedDPOTrainer, tmp_path / "split", {"balancer": prob, "split_groups": True})
    one_logs, split_logs = train_logs(one_pass), train_logs(split)
    assert max_relative_difference(split.model, one_pass.model) <= 1e-6
    assert "balancer/norm/chosen" not in one_logs[0]
    for a, b in zip(one_logs, split_logs, strict=True):
        assert a["balancer/balanced_dpo/prob_factor"] == pytest.approx(b["balancer/balanced_dpo/prob_factor"], rel=1e-6)
    with pytest.raises(TrainerSetupError, match="split_groups=False"):
        trainer(BalancedDPOTrainer, tmp_path / "x", {"balancer": ["balanced_dpo"], "split_groups": False})


def test_logs_carry_trl_and_balancer_entries(tmp_path: Path) -> None:
    logs = train_logs(balanced(tmp_path, ["balanced_dpo"]))
    assert len(logs) == 3
    for entry in logs:
        for key in ("rewards/margins", "logps/chosen", "balancer/norm/chosen", "balancer/weight/rejected"):
            assert math.isfinite(entry[key]), key
        assert entry["balancer/balanced_dpo/chosen_weight"] > 0


def test_balancing_changes_the_update(tmp_path: Path) -> None:
    plain = balanced(tmp_path / "plain", None)
    ours = balanced(tmp_path / "ours", ["balanced_dpo"])
    plain.train()
    ours.train()
    assert max_relative_difference(plain.model, ours.model) > 1e-4


def test_resume_is_exact(tmp_path: Path) -> None:
    plugins = [("balanced_dpo", {"rule": "norm", "beta": 0.5})]
    whole = balanced(tmp_path / "whole", plugins, max_steps=4)
    whole.train()
    first = balanced(tmp_path / "run", plugins, max_steps=4, save_strategy="steps", save_steps=2)
    first.train()
    resumed = balanced(tmp_path / "run", plugins, max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert max_relative_difference(whole.model, resumed.model) == 0.0
    state_whole = whole.balancer.state_dict()["balancer"]["states"]["balanced_dpo"]
    state_resumed = resumed.balancer.state_dict()["balancer"]["states"]["balanced_dpo"]
    torch.testing.assert_close(state_resumed, state_whole, rtol=0, atol=0, equal_nan=True)


def test_lora_trains_the_adapter_only(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    t = BalancedDPOTrainer(
        model=model,
        args=config(tmp_path, gradient_checkpointing=False),
        train_dataset=preference_dataset(),
        processing_class=tiny_tokenizer(),
        balancer=["balanced_dpo"],
    )
    logs = train_logs(t)
    assert all(math.isfinite(e["balancer/norm/chosen"]) and e["balancer/norm/chosen"] > 0 for e in logs)
    for name, p in model.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), name


@pytest.mark.parametrize(
    ("overrides", "plugins", "message"),
    [
        ({"loss_type": ["sft"]}, None, "no preference term"),
        ({"loss_type": ["sigmoid", "sft"], "use_weighting": True}, None, "use_weighting"),
        ({"ld_alpha": 0.5}, [("balanced_dpo", {"rule": "prob"})], "ld_alpha"),
        ({"loss_type": ["sigmoid", "ipo"]}, [("balanced_dpo", {"rule": "prob"})], "mixes summed and token-mean"),
        ({}, [("balanced_dpo", {"chosen": "good", "rejected": "bad"})], "Remove the chosen=/rejected="),
    ],
)
def test_refuses_what_it_cannot_split(tmp_path: Path, overrides: Any, plugins: Any, message: str) -> None:
    with pytest.raises(TrainerSetupError, match=message):
        balanced(tmp_path, plugins, **overrides)


def test_refuses_group_by(tmp_path: Path) -> None:
    with pytest.raises(TrainerSetupError, match="chosen and rejected"):
        trainer(BalancedDPOTrainer, tmp_path, {"balancer": None, "group_by": "task"})


def test_norm_rule_with_ld_alpha_runs_without_taps(tmp_path: Path) -> None:
    """ld_alpha weighs tokens unequally: no taps (the norm rule only logs at them), the groups still split."""
    log = train_logs(balanced(tmp_path, ["balanced_dpo"], ld_alpha=0.5))[0]
    assert math.isnan(log["balancer/balanced_dpo/logp_chosen"])
    assert log["balancer/norm/chosen"] > 0


def tiny_mixtral() -> Any:
    """A 2-layer MoE (4 experts, top 2) that returns its router logits, so TRL adds the auxiliary loss."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=46,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        output_router_logits=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.MixtralForCausalLM(config)


def test_moe_auxiliary_loss_is_ungrouped(tmp_path: Path) -> None:
    """TRL adds the router's load-balancing loss: the run still equals TRL's, and the groups do not see it."""

    def run(cls: Any, coef: float, extra: dict[str, Any]) -> Any:
        t = cls(
            model=tiny_mixtral(),
            ref_model=tiny_mixtral(),
            args=config(tmp_path / f"{cls.__name__}{coef}", router_aux_loss_coef=coef, gradient_checkpointing=False),
            train_dataset=preference_dataset(),
            processing_class=tiny_tokenizer(),
            **extra,
        )
        return t, train_logs(t)

    (plain, _), (ours, with_aux), (_, without_aux) = (
        run(DPOTrainer, 1.0, {}),
        run(BalancedDPOTrainer, 1.0, {"balancer": None}),
        run(BalancedDPOTrainer, 0.0, {"balancer": None}),
    )
    assert ours.aux_loss_enabled
    # float32 rounding: the expert weights sum three backward passes' contributions (seen: 1.05e-6)
    assert max_relative_difference(plain.model, ours.model) <= 3e-6
    first, reference = with_aux[0], without_aux[0]
    assert first["balancer/norm/chosen"] == pytest.approx(reference["balancer/norm/chosen"], rel=1e-6)
    assert first["balancer/norm/rejected"] == pytest.approx(reference["balancer/norm/rejected"], rel=1e-6)
    assert abs(first["grad_norm"] - reference["grad_norm"]) > 1e-3 * reference["grad_norm"]
