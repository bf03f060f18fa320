"""transformers' own GaLore Trainer tests and docs snippets, rewritten for hf_galore (galore-torch not installed).

Our versions of what the GaLore sections of transformers' `tests/trainer/test_trainer_optimizers.py` (and the
older block of `tests/trainer/test_trainer.py`) check: matched modules, training runs (plain, layer-wise, 8-bit,
Adafactor), extra `optim_args`, layer-wise with a scheduler, and the learning-rate display with and without a
scheduler; then every GaLore snippet of transformers' Trainer/optimizer docs with its exact arguments.

Same tiny LLaMA as transformers (vocab 100, hidden 32, 3 layers, 4 heads) and the same `RepeatDataset`, with one
change: `intermediate_size` 37 instead of LlamaConfig's default 11008 and 16-token sequences instead of 128, so a
CPU step takes milliseconds instead of seconds, and runs that only check that training works stop after a few
steps (`max_steps`) instead of 3 epochs. Module names, which is all that targeting sees, are unchanged. The
peak-GPU-memory bound of transformers' Adafactor test runs on the full-size model under the `gpu` marker.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.trainer_utils import check_target_module_exists
from transformers.utils import is_bitsandbytes_available

import hf_galore
from hf_galore.errors import InvalidConfigError, NotAPlaceholderError
from hf_galore.targeting import _BY_REGEX, _Matcher, matches_target

ATTN_MLP = [r".*attn.*", r".*mlp.*"]  # transformers' _ATTN_MLP_TARGET_MODULES
needs_bnb = pytest.mark.skipif(not is_bitsandbytes_available(), reason="needs bitsandbytes")


class RepeatDataset(torch.utils.data.Dataset):
    """transformers' test dataset: one token sequence, `length` times, as input and label."""

    def __init__(self, x: torch.Tensor, length: int = 64) -> None:
        self.x, self.length = x, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x, "labels": self.x}


def tiny_llama(**overrides) -> LlamaForCausalLM:
    values = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37)
    values.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**values))


def repeat_dataset(tokens: int = 16) -> RepeatDataset:
    return RepeatDataset(torch.randint(0, 100, (tokens,)))


def make_args(tmp_path, optim: str, **kwargs) -> TrainingArguments:
    values = dict(learning_rate=1e-9, logging_steps=5, optim=optim)  # transformers' _train_with_llama
    values.update(kwargs)
    return TrainingArguments(
        str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, **values
    )


def train(tmp_path, optim: str, model=None, **kwargs) -> Trainer:
    trainer = Trainer(model or tiny_llama(), make_args(tmp_path, optim, **kwargs), train_dataset=repeat_dataset())
    trainer.train()
    return trainer


def inner(trainer: Trainer) -> torch.optim.Optimizer:
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def projected_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for g in optimizer.param_groups if g.get("low_rank") for p in g["params"]}


def transformers_target_ids(model: torch.nn.Module, targets) -> set[int]:
    """The weights transformers' own GaLore setup targets (its `_setup_low_rank_optimizer`, given torch's AdamW)."""
    from transformers import trainer_optimizer

    setup = getattr(trainer_optimizer, "_setup_low_rank_optimizer", None)
    if setup is None:
        pytest.skip("this transformers has no _setup_low_rank_optimizer to compare with")
    args = SimpleNamespace(optim_target_modules=targets, parallel_mode=None, gradient_accumulation_steps=1)
    _, kwargs = setup(args, model, "galore_adamw", {"galore_adamw": torch.optim.AdamW}, {}, {"lr": 1e-3})
    return {id(p) for p in kwargs["params"][1]["params"]}


def attn_mlp_linear_ids(model: torch.nn.Module) -> set[int]:
    return {
        id(m.weight)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ("attn" in n or "mlp" in n)
    }


# ------------------------------------------------------------------------------------------------ matched modules
MODULE_NAMES = [
    "model.transformer.h.0.ln_1",
    "model.transformer.h.0.attn.q_proj",
    "model.lm_head",
    "model.transformer.h.0.mlp.up_proj",
]


@pytest.mark.parametrize(
    ("targets", "expected", "by_regex"),
    [
        ([r".*.attn.*", r".*.mlp.*"], [False, True, False, True], True),
        (["q_proj", "up_proj"], [False, True, False, True], False),
        (r".*.attn.*", [False, True, False, False], True),
        ("model.transformer.h.0.attn.q_proj", [False, True, False, False], False),
        (["attn", "mlp"], [False, True, False, True], False),
    ],
)
def test_galore_matched_modules(targets, expected, by_regex):
    # transformers' test_galore_matched_modules: which names match, and whether through a regex (which decides
    # whether a matched non-Linear module is warned about).
    for name, want in zip(MODULE_NAMES, expected, strict=True):
        assert matches_target(name, targets) == want == check_target_module_exists(targets, name), (targets, name)
        if want:
            assert (_Matcher.of(targets).kind(name) == _BY_REGEX) == by_regex
            assert check_target_module_exists(targets, name, return_is_regex=True)[1] == by_regex


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize(
    "targets",
    [ATTN_MLP, ["q_proj", "k_proj", "v_proj"], "all-linear", "all_linear", ["attn", "mlp"], r".*\.mlp\..*", "lm_head"],
    ids=repr,
)
def test_projected_weights_are_the_ones_transformers_targets(tmp_path, targets, tie):
    model = tiny_llama(tie_word_embeddings=tie)
    args = make_args(tmp_path, "galore_adamw", optim_target_modules=targets)
    cls, kwargs = hf_galore.optimizer_cls_and_kwargs(args, model)
    projected = projected_ids(cls(**kwargs))
    if tie and targets == "lm_head":
        # Deliberate difference: naming a head tied to the input embedding projects that shared weight; transformers
        # never sees the name "lm_head.weight" (named_parameters() lists it as the embedding) and finds no target.
        assert projected == {id(model.lm_head.weight)} == {id(model.model.embed_tokens.weight)}
        return
    assert projected == transformers_target_ids(model, targets)
    if targets in ("all-linear", "all_linear"):
        # transformers' all-linear includes the head, except when it is tied to the embedding.
        assert (id(model.lm_head.weight) in projected) == (not tie)


# ------------------------------------------------------------------------------------------------ training runs
@pytest.mark.parametrize(
    "optim", ["galore_adamw", "galore_adamw_layerwise", pytest.param("galore_adamw_8bit", marks=needs_bnb)]
)
def test_galore(tmp_path, optim):
    model = tiny_llama()
    trainer = train(tmp_path, optim, model, optim_target_modules=ATTN_MLP, max_steps=4)
    assert trainer.state.global_step == 4
    assert all(math.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)
    optimizer = inner(trainer)
    assert projected_ids(optimizer) == attn_mlp_linear_ids(model) and len(projected_ids(optimizer)) == 21
    assert all(optimizer.state[p] for g in optimizer.param_groups for p in g["params"])  # every parameter stepped


def test_galore_extra_args(tmp_path):
    trainer = train(
        tmp_path,
        "galore_adamw",
        optim_target_modules=ATTN_MLP,
        optim_args="rank=64, update_proj_gap=100, scale=0.10",
        max_steps=4,
    )
    (group,) = [g for g in inner(trainer).param_groups if g.get("low_rank")]
    assert (group["rank"], group["update_proj_gap"], group["scale"]) == (64, 100, 0.10)
    assert trainer.state.global_step == 4


def test_galore_layerwise_with_scheduler(tmp_path):
    trainer = train(
        tmp_path,
        "galore_adamw_layerwise",
        optim_target_modules=ATTN_MLP,
        lr_scheduler_type="cosine",
        max_steps=10,
        logging_steps=2,
    )
    # The Trainer's own cosine schedule drives the real optimizer's groups (no LayerWiseDummyScheduler).
    assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.LambdaLR)
    assert getattr(trainer.lr_scheduler.optimizer, "optimizer", None) is inner(trainer)
    logged = [log["learning_rate"] for log in trainer.state.log_history if "learning_rate" in log]
    assert len(logged) == 5 and all(a > b for a, b in itertools.pairwise(logged))
    assert [g["lr"] for g in inner(trainer).param_groups] == [0.0] * len(inner(trainer).param_groups)


@pytest.mark.parametrize("targets", [ATTN_MLP, ["q_proj", "k_proj", "v_proj"], "all-linear"], ids=repr)
def test_galore_adafactor(tmp_path, targets):
    model = tiny_llama()
    expected = transformers_target_ids(model, targets)
    trainer = train(tmp_path, "galore_adafactor", model, optim_target_modules=targets, max_steps=4)
    assert trainer.state.global_step == 4 and projected_ids(inner(trainer)) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("targets", [ATTN_MLP, ["q_proj", "k_proj", "v_proj"], "all-linear"], ids=repr)
def test_galore_adafactor_peak_gpu_memory(tmp_path, targets):
    # transformers' bound, on its full-size tiny model (intermediate 11008, 128 tokens): peak allocated < 700 MB.
    model = tiny_llama(intermediate_size=11008)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    args = TrainingArguments(
        str(tmp_path), learning_rate=1e-9, logging_steps=5, optim="galore_adafactor",
        optim_target_modules=targets, report_to=[], save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    Trainer(model, args, train_dataset=repeat_dataset(128)).train()
    peak_mb = torch.cuda.max_memory_allocated() / 2**20
    weights_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    assert 2 * weights_mb < peak_mb < 700


# ------------------------------------------------------------------------------------------------ learning rates
@pytest.mark.parametrize("optim", ["galore_adamw", "galore_adamw_layerwise", "galore_adafactor"])
def test_galore_lr_display_without_scheduler(tmp_path, optim):
    learning_rate = 1e-9
    args = make_args(tmp_path, optim, learning_rate=learning_rate, optim_target_modules=ATTN_MLP)
    trainer = Trainer(tiny_llama(), args, train_dataset=repeat_dataset())
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    assert len(trainer.optimizer.param_groups) == 3  # projected, decay, no-decay: shown as transformers' two
    assert trainer.get_learning_rates() == [learning_rate, learning_rate]


def test_lr_display_of_our_own_names_is_per_group(tmp_path):
    args = make_args(tmp_path, "flora_adamw", learning_rate=1e-3, optim_target_modules=ATTN_MLP, optim_args="rank=4")
    trainer = Trainer(tiny_llama(), args, train_dataset=repeat_dataset())
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    assert trainer.get_learning_rates() == [1e-3] * len(trainer.optimizer.param_groups)


def test_galore_lr_display_with_scheduler(tmp_path):
    learning_rate, num_warmup_steps = 2e-4, 5
    args = make_args(
        tmp_path, "galore_adamw", num_train_epochs=2, learning_rate=learning_rate, warmup_steps=num_warmup_steps,
        lr_scheduler_type="cosine", logging_steps=1, optim_target_modules=ATTN_MLP,
    )  # fmt: skip
    trainer = Trainer(tiny_llama(), args, train_dataset=repeat_dataset())
    trainer.train()
    logs = trainer.state.log_history[1:-1]
    # transformers' expectations: the peak is reached at the end of warmup, the last step is ~0, rising then falling.
    assert logs[num_warmup_steps - 1]["learning_rate"] == learning_rate
    assert np.allclose(logs[-1]["learning_rate"], 0, atol=5e-6)
    increasing = [logs[i]["learning_rate"] < logs[i + 1]["learning_rate"] for i in range(num_warmup_steps - 1)]
    decreasing = [
        logs[i]["learning_rate"] > logs[i + 1]["learning_rate"] for i in range(num_warmup_steps - 1, len(logs) - 1)
    ]
    assert all(increasing) and all(decreasing) and len(decreasing) > len(increasing)
    last = trainer.optimizer.param_groups[0]["lr"]
    assert trainer.get_learning_rates() == [last, last]


# ------------------------------------------------------------------------------------------------ layer-wise names
def test_layerwise_optimizer_is_not_the_placeholder(tmp_path):
    trainer = train(tmp_path, "galore_adamw_layerwise", optim_target_modules=ATTN_MLP, max_steps=2)
    optimizer = inner(trainer)
    assert not hasattr(optimizer, "optimizer_dict")  # code probing for transformers' placeholder sees a real one
    with pytest.raises(NotAPlaceholderError, match=r"param_groups") as err:
        optimizer.optimizer_dict  # noqa: B018
    assert isinstance(err.value, AttributeError) and "LayerWiseDummyOptimizer" in str(err.value)
    optimizer.remove_hooks()


def test_per_parameter_layerwise_recipe_drives_our_optimizers():
    # The layer-wise recipe of transformers (before its LayerWiseDummyOptimizer) and of galore-torch's README: one
    # optimizer and one scheduler per parameter, stepped in the parameter's hook. It works with our classes in
    # place of galore-torch's. (transformers' LayerWiseDummyScheduler itself cannot be built on torch >= 2.13 for
    # more than one parameter, whatever the optimizer: LRScheduler zips its one group with every per-parameter rate.)
    from transformers import get_scheduler

    model = tiny_llama()
    optimizer_dict, scheduler_dict = {}, {}
    for name, p in model.named_parameters():
        group = (
            {"params": [p], "low_rank": True, "rank": 4, "update_proj_gap": 2} if "proj" in name else {"params": [p]}
        )
        optimizer_dict[p] = hf_galore.GaLoreAdamW([group], lr=1e-3)
        scheduler_dict[p] = get_scheduler("cosine", optimizer_dict[p], num_warmup_steps=0, num_training_steps=4)

    def hook(p):
        optimizer_dict[p].step()
        optimizer_dict[p].zero_grad()
        scheduler_dict[p].step()

    handles = [p.register_post_accumulate_grad_hook(hook) for p in model.parameters()]
    ids = torch.randint(0, 100, (2, 16))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
    for handle in handles:
        handle.remove()
    projected = model.model.layers[0].self_attn.q_proj.weight
    assert optimizer_dict[projected].state[projected]["step"] == 3
    assert optimizer_dict[projected].state[projected]["exp_avg"].shape in {(4, 32), (32, 4)}  # projected moments
    expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4))  # each per-parameter schedule stepped 3 times
    assert all(o.param_groups[0]["lr"] == pytest.approx(expected) for o in optimizer_dict.values())


# ------------------------------------------------------------------------------------------------ bad values
@pytest.mark.parametrize("targets", [r"model\.layers\.(", [r".*attn.*", "mlp["]], ids=repr)
def test_invalid_regex_fails_before_training_with_our_error(tmp_path, targets):
    trainer = Trainer(tiny_llama(), make_args(tmp_path, "galore_adamw", optim_target_modules=targets),
                      train_dataset=repeat_dataset())  # fmt: skip
    with pytest.raises(InvalidConfigError, match="not a valid regular expression") as err:
        trainer.train()
    assert repr(targets) in str(err.value) and trainer.state.global_step == 0


# ------------------------------------------------------------------------------------------------ docs snippets
# Every GaLore snippet of transformers' docs (trainer.md before and after its rewrite, optimizers.md, and the ["attn",
# "mlp"] list of the translated trainer.md), argument for argument. The docs train google/gemma-2b with trl's
# SFTTrainer; here a tiny Gemma built from its config runs under the stock Trainer (trl is not a dependency), for 3
# steps instead of 100.
DOC_SNIPPETS = {
    "trainer.md galore_adamw": dict(
        max_steps=100, per_device_train_batch_size=2, optim="galore_adamw",
        optim_target_modules=[r".*.attn.*", r".*.mlp.*"],
    ),
    "trainer.md galore_adamw optim_args": dict(
        max_steps=100, per_device_train_batch_size=2, optim="galore_adamw",
        optim_target_modules=[r".*.attn.*", r".*.mlp.*"], optim_args="rank=64, update_proj_gap=100, scale=0.10",
    ),
    "trainer.md galore_adamw_layerwise": dict(
        max_steps=100, per_device_train_batch_size=2, optim="galore_adamw_layerwise",
        optim_target_modules=[r".*.attn.*", r".*.mlp.*"],
    ),
    "trainer.md (ko) galore_adamw_layerwise attn/mlp": dict(
        max_steps=100, per_device_train_batch_size=2, optim="galore_adamw_layerwise",
        optim_target_modules=["attn", "mlp"],
    ),
    "trainer.md SFTConfig galore_adamw": dict(
        max_steps=100, optim="galore_adamw", optim_target_modules=[r".*.attn.*", r".*.mlp.*"],
        optim_args="rank=64, update_proj_gap=100, scale=0.10", gradient_checkpointing=True,
    ),
    "trainer.md SFTConfig galore_adamw_layerwise": dict(
        max_steps=100, optim="galore_adamw_layerwise", optim_target_modules=[r".*.attn.*", r".*.mlp.*"],
        optim_args="rank=64, update_proj_gap=100, scale=0.10", gradient_checkpointing=True,
    ),
    "optimizers.md galore_adamw": dict(
        max_steps=100, optim="galore_adamw", optim_target_modules=[r".*.attn.*", r".*.mlp.*"],
        optim_args="rank=64, update_proj_gap=100, scale=0.10",
    ),
    "optimizers.md galore_adamw_layerwise": dict(
        max_steps=100, optim="galore_adamw_layerwise", optim_target_modules=[r".*.attn.*", r".*.mlp.*"],
        optim_args="rank=64, update_proj_gap=100, scale=0.10",
    ),
}  # fmt: skip


@pytest.mark.parametrize("snippet", sorted(DOC_SNIPPETS))
def test_transformers_docs_galore_snippet(tmp_path, snippet):
    config = GemmaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    model = GemmaForCausalLM(config)
    values = {**DOC_SNIPPETS[snippet], "max_steps": 3}
    args = TrainingArguments(
        str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, **values
    )
    trainer = Trainer(model, args, train_dataset=repeat_dataset())
    trainer.train()
    assert trainer.state.global_step == 3
    assert projected_ids(inner(trainer)) == attn_mlp_linear_ids(model) != set()
    if "optim_args" in values:
        (group,) = [g for g in inner(trainer).param_groups if g.get("low_rank")]
        assert (group["rank"], group["update_proj_gap"], group["scale"]) == (64, 100, 0.10)
    if values["optim"].endswith("layerwise"):
        inner(trainer).remove_hooks()
