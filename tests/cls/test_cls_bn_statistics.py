"""cls.bn_statistics: mu_B, sigma^2_B, g_B and Psi_B of the first normalization group."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mabn
from cls.bn_statistics import STATISTICS, StatisticsRecorder, statistics_dir


class FakeWriter:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars[(tag, step)] = value

    def flush(self):
        pass

    def close(self):
        pass


class Net(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = norm
        self.relu = nn.ReLU(inplace=True)  # in place after the norm, as in the ResNets

    def forward(self, x):
        return self.relu(self.norm(self.conv(x)))


@pytest.mark.parametrize("group", [8, 2])
def test_statistics_match_their_definitions(group):
    torch.manual_seed(0)
    norm = mabn.get_norm("BN", 4) if group == 8 else mabn.get_norm("BN", 4, B=group)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, 1.5, -1.0, 2.0]))
        norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    net = Net(norm)
    writer = FakeWriter()
    recorder = StatisticsRecorder(net, "unused", group_size=group, channel=1, writer=writer)
    x = torch.randn(8, 3, 5, 5)
    head = torch.randn(8, 4, 5, 5)
    recorder.set_step(7)
    (net(x) * head).sum().backward()
    recorder.flush()

    # Reference: the same computation by hand, for the first group of `group` samples.
    with torch.no_grad():
        u = net.conv(x)[:group]
    mean = u.mean((0, 2, 3))
    var = u.var((0, 2, 3), unbiased=False)
    x_hat = ((u - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + norm.eps)).requires_grad_()
    y = x_hat * norm.weight.detach().view(1, -1, 1, 1) + norm.bias.detach().view(1, -1, 1, 1)
    (torch.relu(y) * head[:group]).sum().backward()
    dxhat = x_hat.grad
    expected = {"mu_B": mean, "sigma2_B": var, "g_B": dxhat.mean((0, 2, 3)),
                "Psi_B": (x_hat.detach() * dxhat).mean((0, 2, 3))}
    for stat in STATISTICS:
        got = writer.scalars[(f"norm/{stat}/channel1", 7)]
        assert got == pytest.approx(expected[stat][1].item(), rel=1e-4, abs=1e-5), stat
        summary = writer.scalars[(f"norm/{stat}/mean_abs", 7)]
        assert summary == pytest.approx(expected[stat].abs().mean().item(), rel=1e-4, abs=1e-5), stat
    recorder.close()


def test_interval_eval_mode_and_channel_range():
    net = Net(nn.BatchNorm2d(4))
    writer = FakeWriter()
    recorder = StatisticsRecorder(net, "unused", group_size=4, interval=2, writer=writer)
    for step in range(4):
        recorder.set_step(step)
        net(torch.randn(4, 3, 4, 4)).sum().backward()
        recorder.flush()
    assert sorted({step for _, step in writer.scalars}) == [0, 2]
    net.eval()
    recorder.set_step(4)
    with torch.no_grad():
        net(torch.randn(4, 3, 4, 4))
    recorder.flush()
    assert sorted({step for _, step in writer.scalars}) == [0, 2]
    with pytest.raises(ValueError, match="--stat_channel 4"):
        StatisticsRecorder(net, "unused", group_size=4, channel=4, writer=FakeWriter())
    with pytest.raises(ValueError, match="no batch-normalization"):
        StatisticsRecorder(nn.Conv2d(1, 1, 1), "unused", group_size=4, writer=FakeWriter())


def test_folder_names():
    assert statistics_dir("out", 32, 32).endswith("statistics/bs_32")
    assert statistics_dir("out", 32, 2).endswith("statistics/bs_32_nb2")
