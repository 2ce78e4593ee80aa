"""One count of training tokens: under DDP, the exact sum of every process's unpadded target tokens."""

import json
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import run_script
from tests.test_translate_cli import translator_args
from tests.test_translation_data import write_tsv
from xlab.data.tokenizer import PAD_ID


class TargetTokens(Callback):
    """Test helper: each rank writes ``tokensN.json``, the non-padding target tokens of each of its batches."""

    def __init__(self, directory: str):
        self.directory = Path(directory)
        self.tokens: list[int] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.tokens.append(int((batch["target"] != PAD_ID).sum()))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        (self.directory / f"tokens{trainer.global_rank}.json").write_text(json.dumps(self.tokens))


def test_two_processes_count_the_exact_sum_of_their_target_tokens(tmp_path: Path):
    """Six steps on two processes, validated and saved at steps 3 and 6: every checkpoint and every logged step
    holds the unpadded target tokens of both processes' batches up to that step."""
    pairs = write_tsv(tmp_path / "pairs.tsv")
    args = translator_args(
        pairs,
        "--model.init_args.arch.d_model=32",
        "--model.init_args.max_new_tokens=8",
        "--trainer.max_steps=6",
        "--trainer.val_check_interval=3",
        "--trainer.log_every_n_steps=1",
        "--checkpoint.filename=step{step}",
        "--checkpoint.save_top_k=-1",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.callbacks+=tests.test_tokens.TargetTokens",
        f"--trainer.callbacks.directory={tmp_path}",
    )
    result = run_script("xlab.py", "fit", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    per_rank = [json.loads((tmp_path / f"tokens{rank}.json").read_text()) for rank in (0, 1)]
    assert [len(tokens) for tokens in per_rank] == [6, 6]
    running = list(accumulate(first + second for first, second in zip(*per_rank)))
    assert running[-1] != 2 * sum(per_rank[0])  # the processes' batches differ: world_size x one rank is wrong

    checkpoints = tmp_path / "runs" / "translate" / "checkpoints"
    for name, step in (("step3.ckpt", 3), ("step6.ckpt", 6), ("last.ckpt", 6)):
        saved = torch.load(checkpoints / name, weights_only=False)
        assert saved["global_step"] == step and saved["tokens_seen"] == running[step - 1], name
    events = EventAccumulator(str(checkpoints.parent))
    events.Reload()
    logged = [(event.step, event.value) for event in events.Scalars("train/tokens_seen")]
    assert logged == [(step, float(tokens)) for step, tokens in enumerate(running)]
