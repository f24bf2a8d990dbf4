"""Training processes: a lone process is its own world. Two real processes under torchrun are
tested end to end in test_train.py (test_two_process_ddp_on_cpu)."""

import torch
from torch import nn

from model.training.distributed import Processes


def test_a_lone_process_is_the_main_one_and_changes_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    processes = Processes.start("cpu", "fp32")
    assert (processes.rank, processes.world, processes.is_main) == (0, 1, True)
    assert processes.runtime.device == torch.device("cpu")
    network = nn.Linear(2, 2)
    assert processes.wrap(network) is network  # no DDP prefix on a lone process's names
    values = torch.tensor([1.0, 2.0])
    assert processes.mean(values) is values and values.tolist() == [1.0, 2.0]
    processes.barrier()
    Processes.stop()  # no process group joined: nothing to leave
