"""Helpers to run the stock Trainer on tiny synthetic tasks (offline, deterministic)."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments


def classification_dataset(n: int = 96, length: int = 12, vocab: int = 99, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    labels = (ids[:, 1] > vocab // 2).long()
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def lm_dataset(n: int = 64, length: int = 16, vocab: int = 99, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab, (n, 1), generator=g)
    steps = torch.randint(1, 4, (n, 1), generator=g)
    ids = (starts + steps * torch.arange(length)) % vocab
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def training_args(output_dir, optim: str, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(output_dir),
        optim=optim,
        optim_target_modules="all-linear",
        optim_args="rank=4, update_proj_gap=4, scale=1",
        per_device_train_batch_size=8,
        per_device_eval_batch_size=32,
        max_steps=24,
        learning_rate=5e-3,
        lr_scheduler_type="linear",
        warmup_steps=2,
        weight_decay=0.01,
        max_grad_norm=0.0 if optim.endswith("layerwise") else 1.0,
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def make_trainer(model, args, dataset, **kwargs) -> Trainer:
    return Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset, **kwargs)


def assert_stock_load_without_hf_galore(auto_class: str, quantized_dir, quant_method: str, dense_dir) -> None:
    """In a fresh interpreter that never imports hf_galore, the stock `from_pretrained` of a checkpoint in one of
    our formats must raise (never load random Linears), naming the unknown `quant_method`, and the merged (dense)
    export must load."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import sys
        import transformers
        cls = getattr(transformers, {auto_class!r})
        cls.from_pretrained({str(dense_dir)!r})
        try:
            cls.from_pretrained({str(quantized_dir)!r})
        except Exception as exc:
            print("REFUSED:", type(exc).__name__, exc)
        else:
            print("LOADED")
        assert "hf_galore" not in sys.modules
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "REFUSED: RuntimeError" in result.stdout and "LOADED" not in result.stdout, output
    assert f"Unknown quantization type, got {quant_method}" in output, output
    assert "mismatch" in result.stdout, output


# Refused runs: everything a refused run must leave as it was.
def snapshot_model(model):
    """Everything a refused run must leave as it was: tensors (bitwise), module types, trainable flags, config."""
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m)) for n, m in model.named_modules()],
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        _config_without_use_cache(model),
    )


def assert_model_unchanged(model, snapshot):
    tensors, types, flags, config = snapshot
    after = model.state_dict()
    assert list(after) == list(tensors)
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in tensors.items())
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags
    assert _config_without_use_cache(model) == config


def _config_without_use_cache(model):
    # The stock Trainer sets `use_cache` from its arguments in every constructor; everything else must stay.
    return {k: v for k, v in model.config.to_dict().items() if k != "use_cache"}
