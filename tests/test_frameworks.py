"""TLR inside the training frameworks people use: Hugging Face's Trainer and Lightning.

Tiny models built from configs (nothing is downloaded) on generated data. Each test is
skipped when its framework is not installed (``pip install -e '.[integrations]'``;
``scripts/setup.sh`` installs it).
"""

import json
import math
import warnings

import pytest
import torch
from torch import nn

from tlr_triton import TLR, TLRAdamW


# ----------------------------------------------------------------------------- Hugging Face
class _Tokens(torch.utils.data.Dataset):
    """Sequences with a learnable rule (each token is the previous one plus one, mod the vocabulary)."""

    def __init__(self, n=64, length=16, vocab=32):
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (start + torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def alpha_trainer():
    """The README's idiom: a Trainer whose every log also holds TLR's α (one host read per log,
    before the reporting integrations see the entry)."""
    import transformers

    class TLRTrainer(transformers.Trainer):
        def log(self, logs, *args, **kwargs):
            logs["alpha"] = float(self.optimizer.param_groups[0]["alpha"])
            super().log(logs, *args, **kwargs)

    return TLRTrainer


OPTIMIZERS = {  # (build, initial α)
    "TLR": (lambda params: TLR(params, lr=0.05, momentum=0.9), 0.05),
    "TLRAdamW": (lambda params: TLRAdamW(params, lr=3e-3, window=3), 3e-3),
}


@pytest.mark.parametrize("name, schedule", [("TLR", "linear"), ("TLR", "constant"), ("TLR", "cosine_with_warmup"),
                                            ("TLRAdamW", "linear"), ("TLRAdamW", "cosine_with_warmup")])
def test_hf_trainer_keeps_training_alpha_under_its_scheduler(name, schedule, tmp_path):
    """The Trainer always installs a LambdaLR; its factor multiplies the trained α instead of replacing it."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
                                     eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    build, lr = OPTIMIZERS[name]
    opt = build(model.parameters())
    kind = {"cosine_with_warmup": "cosine"}.get(schedule, schedule)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=40, lr_scheduler_type=kind,
        warmup_steps=6 if schedule == "cosine_with_warmup" else 0, logging_steps=10, save_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = alpha_trainer()(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, None))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    json.dumps(trainer.state.log_history)  # everything logged is a plain number
    group = opt.param_groups[0]
    assert isinstance(group["lr"], float)
    factor = trainer.lr_scheduler.lr_lambdas[0](trainer.state.global_step)
    assert group["lr"] == pytest.approx(lr * factor)  # the schedule's value, as HF computes it
    alphas = [entry["alpha"] for entry in logs]
    assert len(set(alphas)) > 2 and alphas[-1] != pytest.approx(lr)  # α trained under the schedule
    assert logs[-1]["loss"] < logs[0]["loss"]


# ----------------------------------------------------------------------------- Lightning
def test_lightning_trains_with_tlr_and_logs_numbers(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

        def training_step(self, batch, _):
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            self.log("alpha", self.optimizers().optimizer.param_groups[0]["alpha"])  # a tensor: read when logged
            return loss

        def configure_optimizers(self):
            opt = TLR(self.parameters(), lr=0.01, momentum=0.9)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    module = Module()
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", logger=CSVLogger(str(tmp_path)), log_every_n_steps=4,
                         callbacks=[LearningRateMonitor(logging_interval="step")], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*copy construct.*")  # LearningRateMonitor on a tensor lr
        trainer.fit(module, loader)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")))
    lrs = [float(r["lr-TLR"]) for r in rows if r.get("lr-TLR")]
    alphas = [float(r["alpha"]) for r in rows if r.get("alpha")]
    assert lrs and all(math.isfinite(v) for v in lrs) and min(lrs) < max(lrs)  # the StepLR schedule, as numbers
    assert len(set(alphas)) > 2
    losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    assert losses[-1] < losses[0]
