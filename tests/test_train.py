import torch
from torch.optim.swa_utils import AveragedModel

from fastddpm.train import ema_with_warmup


def test_ema_update_formula_with_warmup():
    # ema ← d·ema + (1 − d)·θ with d = min(decay, (1 + n)/(10 + n)), n = updates done before this one
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = AveragedModel(net, multi_avg_fn=ema_with_warmup(0.9), use_buffers=True)
    expected = [p.detach().clone() for p in net.parameters()]
    for step in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update_parameters(net)
        if step == 0:  # AveragedModel copies the weights on its first update
            expected = [p.detach().clone() for p in net.parameters()]
            continue
        d = min(0.9, (1 + step) / (10 + step))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, net.parameters())]
    for e, p in zip(expected, ema.module.parameters()):
        torch.testing.assert_close(p, e, rtol=1e-6, atol=1e-6)
