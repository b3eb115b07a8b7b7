"""BalancedGRPOTrainer against trl.GRPOTrainer on a tiny float32 Llama (CPU, nothing downloaded)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import transformers  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from balancer import GroupStats, Plugin, unwrap  # noqa: E402
from balancer.integrations._hf_groups import GroupingError, TrainerSetupError  # noqa: E402
from balancer.integrations._trl_grpo import TASK_KEY, BalancedGRPOTrainer, _check_grpo_args  # noqa: E402
from balancer.integrations._trl_grpo_sampler import StratifiedRepeatSampler  # noqa: E402
from balancer.integrations._trl_grpo_stats import TaskMetrics, row_groups  # noqa: E402
from tests.integrations.trl_fixtures import (  # noqa: E402
    common_args,
    max_relative_difference,
    tiny_llama,
    tiny_tokenizer,
)

# TRL's configs turn gradient checkpointing on; transformers 5 renames it and warns on every use.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing_disable` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing_kwargs` is deprecated:FutureWarning"),
]

TASKS = ("digits", "letters", "variety")
COMPLETION = 5


@pytest.fixture(autouse=True)
def _quiet_transformers() -> None:
    transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Llama saved once: TRL loads the reference model (beta > 0) from the policy's path."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(path)
    return str(path)


def reward(completions: list[str], task: list[str], **_: Any) -> list[float]:
    """Verifiable toy rewards by the prompt's task, weighted by position so that two completions rarely tie:
    digits, letters, or distinct characters (a length-like score)."""
    scores = []
    for text, name in zip(completions, task, strict=True):
        text = text.replace(" ", "")  # the character tokenizer decodes with spaces between tokens
        if name == "digits":
            scores.append(sum(i + 1.0 for i, c in enumerate(text) if c.isdigit()))
        elif name == "letters":
            scores.append(sum(i + 1.0 for i, c in enumerate(text) if c.isalpha()))
        else:
            scores.append(len(set(text)) / COMPLETION)
    return scores


def dataset(n: int = 12, tasks: tuple[str, ...] = TASKS) -> Any:
    g = torch.Generator().manual_seed(3)
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz+-="
    prompts = ["".join(alphabet[int(i)] for i in torch.randint(0, len(alphabet), (2 + k % 3,), generator=g)) + "?"
               for k in range(n)]  # fmt: skip
    return datasets.Dataset.from_dict({"prompt": prompts, "task": [tasks[k % len(tasks)] for k in range(n)]})


def config(tmp_path: Path, **overrides: Any) -> GRPOConfig:
    base: dict[str, Any] = dict(num_generations=2, max_completion_length=COMPLETION, bf16=False, beta=0.0)
    fields = common_args(tmp_path / "out", **{**base, **overrides})
    return GRPOConfig(**fields)


def make(
    tmp_path: Path,
    cls: type = BalancedGRPOTrainer,
    model: Any = None,
    data: Any = None,
    trainer: dict[str, Any] | None = None,
    **overrides: Any,
) -> Any:
    kwargs = dict(trainer or {})
    if issubclass(cls, BalancedGRPOTrainer):
        kwargs.setdefault("group_by", "task")
    return cls(
        model=tiny_llama() if model is None else model,
        reward_funcs=reward,
        args=config(tmp_path, **overrides),
        train_dataset=dataset() if data is None else data,
        processing_class=tiny_tokenizer(),
        **kwargs,
    )


def counting(cls: type) -> type:
    """``cls`` counting its generations."""

    class Counting(cls):  # type: ignore[misc, valid-type]
        generations = 0

        def _generate_and_score_completions(self, inputs: Any) -> Any:
            type(self).generations += 1
            return super()._generate_and_score_completions(inputs)

    return Counting


def logged(trainer: Any, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


# -- equivalence with GRPOTrainer ----------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_no_plugin_equals_grpo_trainer(tmp_path: Path, model_dir: str, beta: float) -> None:
    """Gradient accumulation 2, clipping at 0.5 (active), 3 steps, SGD: the parameters move linearly with the
    gradient, so this bounds the gradient error. beta > 0 adds TRL's (bias-corrected) KL term and an entropy
    bonus, both ungrouped."""
    runs = []
    for cls in (GRPOTrainer, BalancedGRPOTrainer):
        # with beta > 0 also an entropy bonus: a second ungrouped term, through the model's entropies
        extra = {"entropy_coef": 0.01} if beta else {}
        trainer = make(tmp_path, counting(cls), model=model_dir, beta=beta, optim="sgd", **extra)
        trainer.train()
        runs.append((trainer, torch.random.get_rng_state()))
    (plain, plain_rng), (balanced, balanced_rng) = runs
    assert max_relative_difference(plain.model, balanced.model) <= 1e-6
    assert type(plain).generations == type(balanced).generations == 3  # one generation batch per step
    assert torch.equal(plain_rng, balanced_rng)  # the same random numbers were drawn (sampling, shuffles)
    assert logged(balanced, "grad_norm") == pytest.approx(logged(plain, "grad_norm"), rel=1e-5)
    assert max(logged(plain, "grad_norm")) > 0.5  # clipping acted
    assert logged(balanced, "reward") == logged(plain, "reward")  # the same completions
    if beta:
        assert logged(balanced, "kl") == pytest.approx(logged(plain, "kl"), rel=1e-5, abs=1e-9)
    assert logged(balanced, "step_time")  # GRPO's own bookkeeping kept


# -- the split is exact --------------------------------------------------------------------------
def reference_gram(model_dir: str, batch: dict[str, Any], names: list[str], vocabulary: list[str]) -> torch.Tensor:
    """Float64 Gram matrix of the per-task gradients of GRPO's on-policy policy loss (loss_type 'dapo', ratio 1):
    ``g_k = -Σ_{i in k} A_i Σ_t m_it ∇ log π(o_it) / N`` with ``N`` the completion tokens, computed with the
    model's ordinary forward and log-softmax (not TRL's fused head)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).double()
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    width = batch["completion_ids"].shape[1]
    logp, mask = logp[:, -width:], batch["completion_mask"].double()
    per_row = -(batch["advantages"].double()[:, None] * logp * mask).sum(dim=1) / mask.sum()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for name in names:
        selected = torch.tensor([vocabulary[k] == name for k in batch[TASK_KEY].tolist()])
        grads = torch.autograd.grad(per_row[selected].sum(), params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    flat = torch.stack(rows)
    return flat @ flat.T


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_task_gradients_are_the_exact_split(tmp_path: Path, model_dir: str, beta: float) -> None:
    """One micro-batch, one step: each task's group gradient is the policy loss of its completions (other tasks'
    advantages zeroed), to float32 rounding against a float64 reference; the KL term (beta > 0) is in no group."""
    batches: list[dict[str, Any]] = []

    class Capturing(BalancedGRPOTrainer):
        def balanced_backward(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            batches.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
            return super().balanced_backward(model, inputs, num_items_in_batch)

    trainer = make(
        tmp_path, Capturing, model=model_dir, beta=beta, max_steps=1, per_device_train_batch_size=12,
        gradient_accumulation_steps=1, max_grad_norm=1e9, optim="sgd",
    )  # fmt: skip
    trainer.train()
    stats = unwrap(trainer.optimizer).last_stats
    (batch,) = batches
    vocabulary = trainer._task_names
    assert vocabulary == sorted(TASKS)
    assert set(stats.names) == {vocabulary[k] for k in batch[TASK_KEY].tolist()}
    expected = reference_gram(model_dir, batch, list(stats.names), vocabulary)
    assert (expected.diagonal() > 1e-8).sum() >= 2  # at least two tasks with a gradient
    assert torch.allclose(stats.gram, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


# -- plugins and logs ----------------------------------------------------------------------------
def test_task_norm_equalises_task_norms_and_logs_per_task(tmp_path: Path) -> None:
    plain = make(tmp_path)
    plain.train()
    balanced = make(tmp_path, trainer={"balancer": ["task_norm"]})
    balanced.train()
    assert max_relative_difference(plain.model, balanced.model) > 1e-3  # the update changed
    last = balanced.state.log_history[-2]
    names = [t for t in TASKS if f"balancer/norm/{t}" in last]
    assert len(names) >= 2
    weighted = [last[f"balancer/weight/{t}"] * last[f"balancer/norm/{t}"] for t in names if last[f"balancer/norm/{t}"]]
    assert len(weighted) >= 2
    assert weighted == pytest.approx([weighted[0]] * len(names), rel=1e-4)
    for entry in balanced.state.log_history[:-1]:
        tasks = [t for t in TASKS if f"balancer/completions/{t}" in entry]
        assert sum(entry[f"balancer/completions/{t}"] for t in tasks) == 8  # the generation batch
        for t in tasks:
            assert {f"balancer/reward/{t}", f"balancer/advantage/{t}", f"balancer/abs_advantage/{t}"} <= set(entry)
    # per-task rewards average to TRL's reward, weighted by completions
    for entry in balanced.state.log_history[:-1]:
        tasks = [t for t in TASKS if f"balancer/completions/{t}" in entry]
        total = sum(entry[f"balancer/reward/{t}"] * entry[f"balancer/completions/{t}"] for t in tasks) / 8
        assert total == pytest.approx(entry["reward"], rel=1e-5)


def test_task_stats_split_half_and_learning_gain(tmp_path: Path) -> None:
    """Stratified generation batches of 6 prompts: every task has 2, captured as halves ``task/A``, ``task/B``;
    SplitHalf makes task_norm weigh tasks."""
    trainer = make(
        tmp_path, per_device_train_batch_size=6, max_steps=3,
        trainer={"balancer": ["task_norm"], "stratify": True, "task_stats": True},
    )  # fmt: skip
    trainer.train()
    opt = unwrap(trainer.optimizer)
    stats = opt.last_stats
    assert sorted(stats.names) == sorted(f"{t}/{h}" for t in TASKS for h in "AB")
    where = {n: i for i, n in enumerate(stats.names)}
    last = trainer.state.log_history[-2]
    pooled = []
    for t in TASKS:
        a, b = where[f"{t}/A"], where[f"{t}/B"]
        assert last[f"balancer/split_half_sq_norm/{t}"] == pytest.approx(4 * stats.gram[a, b].item(), rel=1e-6)
        sq = (stats.gram[a, a] + stats.gram[b, b] + 2 * stats.gram[a, b]).item()
        assert last[f"balancer/sq_norm/{t}"] == pytest.approx(sq, rel=1e-6)
        assert stats.weights[a] == stats.weights[b]  # both halves get the task's weight
        if sq > 0:  # a task whose completions all scored the same has no gradient, whatever its weight
            pooled.append(stats.weights[a].item() * sq**0.5)
    assert len(pooled) >= 2
    assert pooled == pytest.approx([pooled[0]] * len(pooled), rel=1e-4)  # task_norm equalised the tasks' norms
    assert last["balancer/sq_norm_ratio"] >= 1.0
    gains = [e for e in trainer.state.log_history if "balancer/learning_gain/digits" in e]
    assert len(gains) == 2  # from the second step on
    rewards = logged(trainer, "balancer/reward/digits")
    assert gains[-1]["balancer/learning_gain/digits"] == pytest.approx(rewards[2] - rewards[1], abs=1e-6)


def test_task_metrics_unequal_halves_and_learning_gain_restart() -> None:
    """The split-half arithmetic without a model: a task with 3 prompts is split 2 + 1 and its estimate is
    ``n²/(a·b) ⟨g_A, g_B⟩ = 9/2 ⟨g_A, g_B⟩``; a task with one prompt is not split. The learning gain needs a
    previous generation of the task, so a fresh ``TaskMetrics`` (as after a resume) logs none at first."""
    names = ["digits", "letters"]
    tasks = torch.tensor([0, 0, 1, 1, 0, 0, 0, 0])  # 2 completions per prompt: digits, letters, digits, digits
    metrics = TaskMetrics(split_half=True)
    halves = metrics.split_halves(names, tasks, generations=2)
    assert halves.tolist() == [0, 0, -1, -1, 1, 1, 0, 0]
    assert metrics.half_counts == {"digits": (2, 1)}
    assert row_groups(names, tasks, halves)[:4] == ["digits/A", "digits/A", "letters", "letters"]
    gram = torch.tensor([[4.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 9.0]], dtype=torch.float64)
    stats = GroupStats.from_gram(gram, ["digits/A", "digits/B", "letters"])
    log: defaultdict[str, list[float]] = defaultdict(list)
    metrics.record(5, log, names, stats)
    metrics.record(5, log, names, stats)  # once per step
    assert log["balancer/sq_norm/digits"] == [4.0 + 2.0 + 2 * 1.0]
    assert log["balancer/split_half_sq_norm/digits"] == [pytest.approx(1.0 * 9 / 2)]
    assert log["balancer/sq_norm/letters"] == [9.0] and "balancer/split_half_sq_norm/letters" not in log
    assert log["balancer/sq_norm_ratio"] == [pytest.approx(9.0 / 8.0)]
    rewards, advantages = torch.where(tasks == 0, 2.0, 5.0), torch.zeros(8)
    metrics.log_scores(log, names, tasks, rewards, advantages, train=True)
    assert "balancer/learning_gain/digits" not in log  # no previous generation of the task yet
    metrics.log_scores(log, names, tasks, rewards + 0.5, advantages, train=True)
    assert log["balancer/reward/digits"] == [2.0, 2.5]
    assert log["balancer/learning_gain/digits"] == [0.5] and log["balancer/completions/letters"] == [2.0, 2.0]
    resumed: defaultdict[str, list[float]] = defaultdict(list)
    TaskMetrics(split_half=True).log_scores(resumed, names, tasks, rewards, advantages, train=True)
    assert "balancer/learning_gain/digits" not in resumed


def test_aggregator_and_third_party_plugin_run(tmp_path: Path) -> None:
    class HalveFirst(Plugin):
        """A plugin as a third-party package would write it: halves the first group's weight."""

        name = "halve_first"
        calls = 0

        def init(self) -> dict[str, Any]:
            return {}

        def update(self, stats: Any, weights: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
            type(self).calls += 1
            return weights * torch.cat([weights.new_tensor([0.5]), weights.new_ones(len(weights) - 1)]), state

    trainer = make(tmp_path, trainer={"balancer": ["upgrad", HalveFirst()]})
    trainer.train()
    assert HalveFirst.calls == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert (
        "balancer/weight/digits" in trainer.state.log_history[-2]
        or "balancer/weight/letters" in (trainer.state.log_history[-2])
    )


def test_peft_lora_with_kl_equals_grpo_trainer(tmp_path: Path, model_dir: str) -> None:
    """LoRA with TRL's defaults (gradient checkpointing, whose input-grad hook is neutralised) and beta > 0 (the
    reference is the model with the adapter disabled): only adapter weights move, as with GRPOTrainer."""
    peft = pytest.importorskip("peft")
    runs = []
    for cls in (GRPOTrainer, BalancedGRPOTrainer):
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        trainer = make(tmp_path, cls, model=model_dir, beta=0.1, optim="sgd", trainer={"peft_config": lora})
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
        assert changed and all("lora_" in n for n in changed)
        runs.append(trainer)
    plain, balanced = runs
    assert max_relative_difference(plain.model, balanced.model) <= 1e-6
    assert logged(balanced, "kl") == pytest.approx(logged(plain, "kl"), rel=1e-5, abs=1e-9)
    assert "balancer/norm/digits" in balanced.state.log_history[-2]


# -- stratified sampling -------------------------------------------------------------------------
def test_stratified_repeat_sampler_order() -> None:
    names = ["a"] * 6 + ["b"] * 3 + ["c"] * 3
    sampler = StratifiedRepeatSampler(names, mini_repeat_count=2, batch_size=3, repeat_count=2, seed=0)
    order = list(sampler)
    assert len(order) == len(sampler) == 12 * 2 * 2
    batches = [order[i : i + 12] for i in range(0, len(order), 12)]  # 3 prompts x 2 generations x 2 repeats
    for batch in batches:
        assert batch[:6] == batch[6:]  # the generation batch is repeated
        assert all(batch[i] == batch[i + 1] for i in range(0, 6, 2))  # each prompt num_generations times
    for batch in batches[:3]:
        assert {names[i] for i in batch} == {"a", "b", "c"}
    assert order == list(StratifiedRepeatSampler(names, 2, 3, 2, seed=0))  # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_stratify_puts_every_task_in_every_step(tmp_path: Path) -> None:
    trainer = make(tmp_path, max_steps=3, trainer={"stratify": True})
    assert isinstance(trainer._get_train_sampler(), StratifiedRepeatSampler)
    trainer.train()
    for entry in trainer.state.log_history[:-1]:
        assert all(f"balancer/completions/{t}" in entry for t in TASKS)
        assert set(unwrap(trainer.optimizer).last_stats.names) == set(TASKS)


# -- resume --------------------------------------------------------------------------------------
class StopAt(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        control.should_training_stop = state.global_step >= self.step
        return control


def test_resume_is_exact(tmp_path: Path) -> None:
    """Parameters, grad_norm and the per-task statistics, learning gain included (its state is checkpointed)."""
    setup = dict(per_device_train_batch_size=6, max_steps=4)
    plugins = {"balancer": ["task_norm"], "stratify": True, "task_stats": True}
    whole = make(tmp_path / "whole", trainer=plugins, **setup)
    whole.train()
    stop = {**plugins, "callbacks": [StopAt(2)]}
    first = make(tmp_path / "resumed", save_strategy="steps", save_steps=2, trainer=stop, **setup)
    first.train()
    assert first.state.global_step == 2
    resumed = make(tmp_path / "resumed", trainer=plugins, **setup)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "out" / "checkpoint-2"))
    assert max_relative_difference(whole.model, resumed.model) <= 1e-6
    assert logged(resumed, "grad_norm")[-2:] == pytest.approx(logged(whole, "grad_norm")[-2:], rel=1e-6)
    for task in TASKS:
        key = f"balancer/learning_gain/{task}"
        assert len(logged(whole, key)) == 3  # steps 2, 3, 4
        # steps 2 (from the checkpoint's log history), 3 (needs the checkpointed state) and 4
        assert logged(resumed, key) == pytest.approx(logged(whole, key), rel=1e-6, abs=1e-9)


# -- refusals ------------------------------------------------------------------------------------
def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(TrainerSetupError, match="needs group_by"):
        make(tmp_path, trainer={"group_by": None})
    with pytest.raises(TrainerSetupError, match="'topic' is not a column"):
        make(tmp_path, trainer={"group_by": "topic"})
    with pytest.raises(TrainerSetupError, match="use_vllm=True"):
        make(tmp_path, use_vllm=True)
    with pytest.raises(TrainerSetupError, match="use_reentrant"):
        make(tmp_path, gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(TrainerSetupError, match="steps_per_generation=4 must equal"):
        make(tmp_path, steps_per_generation=4, trainer={"task_stats": True})
    with pytest.raises(TrainerSetupError, match="task_stats=True needs num_iterations=1, not num_iterations=2"):
        make(tmp_path, num_iterations=2, trainer={"task_stats": True})
    assert make(tmp_path, num_iterations=2).num_iterations == 2  # without task_stats, num_iterations > 1 is fine
    with pytest.raises(TrainerSetupError, match="famo"):
        make(tmp_path, trainer={"balancer": ["famo"]})
    with pytest.raises(TrainerSetupError, match="a generation batch holds 4 prompts"):
        make(tmp_path, data=dataset(tasks=tuple("abcde")), trainer={"stratify": True})._get_train_sampler()
    fields = dict(use_vllm=False, gradient_checkpointing=False, deepspeed=None, fsdp=None)
    with pytest.raises(TrainerSetupError, match="not under FSDP"):
        _check_grpo_args(SimpleNamespace(**{**fields, "fsdp": "full_shard"}), task_stats=False)
    _check_grpo_args(SimpleNamespace(**{**fields, "deepspeed": "ds.json"}), task_stats=False)  # one forward per task


def test_loss_term_outside_the_model_outputs_is_refused(tmp_path: Path) -> None:
    """A custom compute_loss that uses a parameter directly: that part of the gradient cannot be split by
    task, so the step stops instead of dropping it."""

    class WeightPenalty(BalancedGRPOTrainer):
        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            return loss + 1e-3 * self.model.lm_head.weight.square().sum()

    trainer = make(tmp_path, WeightPenalty, max_steps=1)
    with pytest.raises(GroupingError, match=r"depends on a tensor of shape \(46, 32\) that requires grad"):
        trainer.train()


# -- two ranks (DDP, gloo) -----------------------------------------------------------------------
DDP_SCRIPT = """
import json, os, sys, warnings
from pathlib import Path
sys.path.insert(0, {root!r})
warnings.simplefilter("ignore")
import torch, transformers
transformers.logging.set_verbosity_error()
from trl import GRPOTrainer
from balancer.integrations._trl_grpo import BalancedGRPOTrainer
from tests.integrations.test_trl_grpo import make
out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
for name, cls in (("plain", GRPOTrainer), ("balanced", BalancedGRPOTrainer)):
    trainer = make(out / name, cls, model={model!r}, beta=0.1, optim="sgd", per_device_train_batch_size=2,
                   max_steps=2)
    trainer.train()
    torch.save([p.detach() for p in trainer.model.parameters()], out / f"{{name}}-{{rank}}.pt")
    (out / f"{{name}}-{{rank}}.json").write_text(json.dumps(trainer.state.log_history))
"""


def test_two_ranks_equal_grpo_trainer(launch: Any, tmp_path: Path, model_dir: str) -> None:
    """Each rank's micro-batches hold different tasks; every rank captures the tasks present on any rank (a zero
    pass for those it lacks). No plugin: the update equals GRPOTrainer's; logs are the same on both ranks."""
    import json

    root = str(Path(__file__).resolve().parents[2])
    launch(DDP_SCRIPT.format(root=root, model=model_dir), timeout=240)
    for rank in (0, 1):
        plain, balanced = (torch.load(tmp_path / f"{name}-{rank}.pt") for name in ("plain", "balanced"))
        worst = max(((p - q).abs().max() / p.abs().max()).item() for p, q in zip(plain, balanced, strict=True))
        assert worst <= 1e-6
    logs = [json.loads((tmp_path / f"balanced-{rank}.json").read_text()) for rank in (0, 1)]
    assert logs[0][-2] == {**logs[1][-2], "step_time": logs[0][-2]["step_time"]}
    assert any(key.startswith("balancer/norm/") for key in logs[0][-2])
