"""The dynamo-free optimizers give torch.optim's bits, step by step, and import no torch._dynamo."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from repdissect.stages._optim import PlainAdam, PlainSGD


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))


def _groups(net: torch.nn.Module, decay: float) -> list[dict]:
    params = list(net.parameters())
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


CASES = [  # (name, torch factory, plain factory): the settings stages/_training.py and the AM stage use
    ("sgd nesterov + L2", lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, nesterov=True),
     lambda g: PlainSGD(g, lr=0.05, momentum=0.9, nesterov=True)),
    ("sgd plain", lambda g: torch.optim.SGD(g, lr=0.05), lambda g: PlainSGD(g, lr=0.05)),
    ("sgd momentum + dampening", lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.8, dampening=0.1),
     lambda g: PlainSGD(g, lr=0.05, momentum=0.8, dampening=0.1)),
    ("adamw", lambda g: torch.optim.AdamW(g, lr=2e-3, betas=(0.9, 0.999)),
     lambda g: PlainAdam(g, lr=2e-3, betas=(0.9, 0.999), decoupled=True)),
    ("adam + L2", lambda g: torch.optim.Adam(g, lr=1e-2, betas=(0.8, 0.99)),
     lambda g: PlainAdam(g, lr=1e-2, betas=(0.8, 0.99))),
]


@pytest.mark.parametrize("name, reference, plain", CASES, ids=[c[0] for c in CASES])
def test_same_bits_as_torch_optim(name, reference, plain):
    nets = [_net(3), _net(3)]
    opts = [reference(_groups(nets[0], 1e-3)), plain(_groups(nets[1], 1e-3))]
    factor = lambda step: 0.04 + 0.96 * min(1.0, step / 4) * (0.5 if step > 6 else 1.0)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(opts[0], factor)
    opts[1].set_lr_factor(factor(0))
    gen = torch.Generator().manual_seed(0)
    for step in range(10):
        x = torch.randn(8, 3, 8, 8, generator=gen)
        y = torch.randint(0, 5, (8,), generator=gen)
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        scheduler.step()
        opts[1].set_lr_factor(factor(step + 1))
        assert opts[1].param_groups[0]["lr"] == opts[0].param_groups[0]["lr"]
        for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
            assert torch.equal(a, b), f"{name}: step {step} differs"
    assert all(p.grad is not None for p in nets[1].parameters())
    opts[1].zero_grad()
    assert all(p.grad is None for p in nets[1].parameters())


@pytest.mark.parametrize("make, match", [
    (lambda: PlainSGD([], lr=0.1), "empty parameter list"),
    (lambda: PlainSGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, nesterov=True), "Nesterov"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_no_dynamo_import():
    code = ("import sys, torch\nfrom repdissect.stages._optim import PlainAdam, PlainSGD\n"
            "for make in (lambda g: PlainSGD(g, lr=0.1, momentum=0.9, nesterov=True), lambda g: PlainAdam(g, lr=0.1)):\n"
            "    net = torch.nn.Linear(3, 2); opt = make(net.parameters())\n"
            "    net(torch.ones(4, 3)).sum().backward(); opt.step(); opt.zero_grad()\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
