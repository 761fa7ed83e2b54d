"""The MAE linear-probe head: BatchNorm without affine + Linear, and one SGD step on a frozen encoder."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from beyond_cls.heads import AbMILP, LinearProbe
from tests.heads.head_checks import D, tokens


def test_linear_probe_shape():
    probe = LinearProbe(AbMILP(D, num_prefix_tokens=5), D, num_classes=10)
    assert probe(tokens(201, batch=4)).shape == (4, 10)


def test_linear_probe_head_and_one_sgd_step():
    encoder = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=D,
        depth=1,
        num_heads=4,
        num_classes=0,
        reg_tokens=4,
        no_embed_class=True,
    )
    encoder.requires_grad_(False)
    probe = LinearProbe(AbMILP(D, num_prefix_tokens=encoder.num_prefix_tokens), D, num_classes=100, init="mae")
    bn, linear = probe.head
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and bn.weight is None and bn.eps == 1e-6
    assert list(bn.parameters()) == []
    assert abs(linear.weight.std().item() - 0.01) < 0.001
    assert torch.equal(linear.bias, torch.zeros(100))
    assert {n for n, _ in probe.named_parameters()} == {
        "aggregation.scorer.0.weight",
        "aggregation.scorer.0.bias",
        "head.1.weight",
        "head.1.bias",
    }
    before_enc = {n: x.clone() for n, x in encoder.state_dict().items()}
    before = {n: x.detach().clone() for n, x in probe.named_parameters()}
    running_mean = bn.running_mean.clone()
    opt = torch.optim.SGD(probe.parameters(), lr=1.0)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,))
    loss = F.cross_entropy(probe(encoder.forward_features(images)), labels)
    loss.backward()
    opt.step()
    assert all(x.grad is None for x in encoder.parameters())
    assert all(torch.equal(x, before_enc[n]) for n, x in encoder.state_dict().items())
    for name in ("aggregation.scorer.0.weight", "head.1.weight", "head.1.bias"):
        assert not torch.equal(dict(probe.named_parameters())[name], before[name]), name
    assert not torch.equal(bn.running_mean, running_mean)
