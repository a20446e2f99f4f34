"""A toy state-based policy and toy tasks, just big enough to make real finetuning deltas.

The parameter names follow skillbank's reference layout (vision. / language. / action.), so
per-group alphas work on it. Each task maps a 16-d observation to a 4-d action through its own
fixed random function; "demos" are samples of it.
"""

from __future__ import annotations

import torch
from torch import nn

OBS, ACT, N_TASKS = 16, 4, 8


class ToyPolicy(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision = nn.Sequential(nn.Linear(OBS, 128), nn.GELU(), nn.Linear(128, 128))
        self.language = nn.Sequential(nn.Embedding(N_TASKS, 64), nn.Linear(64, 128))
        self.action = nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.Linear(128, ACT))

    def forward(self, obs: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        return self.action(torch.cat([self.vision(obs), self.language(task)], dim=-1))


def expert(task: int) -> nn.Module:
    g = torch.Generator().manual_seed(1000 + task)
    w1, w2 = torch.randn(OBS, 32, generator=g) / 4, torch.randn(32, ACT, generator=g) / 4
    return lambda obs: torch.tanh(torch.tanh(obs @ w1) @ w2)


def demos(task: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, OBS, generator=g)
    return obs, torch.full((n,), task), expert(task)(obs)


def train(model: ToyPolicy, tasks: list[int], n: int, steps: int, seed: int, lr: float = 3e-3) -> ToyPolicy:
    data = [demos(t, n, seed + t) for t in tasks]
    obs, task, act = (torch.cat(x) for x in zip(*data))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(obs), (256,), generator=g)
        loss = nn.functional.mse_loss(model(obs[idx], task[idx]), act[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@torch.no_grad()
def error(model: ToyPolicy, tasks: list[int]) -> float:
    """Mean squared action error on fresh samples of the given tasks (lower is better)."""
    errs = []
    for t in tasks:
        obs, task, act = demos(t, 2000, seed=99_000 + t)
        errs.append(nn.functional.mse_loss(model(obs, task), act).item())
    return sum(errs) / len(errs)


def state_dict_mixed(model: ToyPolicy) -> dict[str, torch.Tensor]:
    """Vision weights in bf16, the rest fp32, plus an integer buffer: dtypes as real checkpoints mix them."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    sd = {k: v.to(torch.bfloat16) if k.startswith("vision.") else v for k, v in sd.items()}
    sd["action.num_updates"] = torch.tensor([0], dtype=torch.int64)
    return sd


def load_mixed(model: ToyPolicy, sd: dict[str, torch.Tensor]) -> ToyPolicy:
    model.load_state_dict({k: v.float() for k, v in sd.items() if k != "action.num_updates"})
    return model
