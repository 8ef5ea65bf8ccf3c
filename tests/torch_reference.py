"""An independent PyTorch PSPNet in the authors' (semseg) state-dict layout, for parity tests.

Written from the paper (Zhao et al., CVPR 2017) and the authors' ``model/pspnet.py`` and
``model/resnet.py`` (github.com/hszhao/semseg at commit 4f274c3f), not from pspnet_jax: it
shares no code with the JAX model, so agreement between the two is evidence that both
compute PSPNet. Options cover the variants pspnet_jax supports: depth 18/34/50/101/152,
stems deep / deep32 / torchvision, output stride 8/16, first-block dilation contraction,
align_corners.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAYERS = {
  18: (2, 2, 2, 2),
  34: (3, 4, 6, 3),
  50: (3, 4, 6, 3),
  101: (3, 4, 23, 3),
  152: (3, 8, 36, 3),
}


class Basic(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride, dilation, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(
      inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False
    )
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    idt = x if self.downsample is None else self.downsample(x)
    out = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(out)) + idt)


class Bottle(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride, dilation, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(
      planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False
    )
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = downsample

  def forward(self, x):
    idt = x if self.downsample is None else self.downsample(x)
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    return F.relu(self.bn3(self.conv3(out)) + idt)


class PPM(nn.Module):
  def __init__(self, in_dim, reduction_dim, bins):
    super().__init__()
    self.features = nn.ModuleList(
      [
        nn.Sequential(
          nn.AdaptiveAvgPool2d(b),
          nn.Conv2d(in_dim, reduction_dim, 1, bias=False),
          nn.BatchNorm2d(reduction_dim),
          nn.ReLU(inplace=True),
        )
        for b in bins
      ]
    )

  def forward(self, x, align_corners):
    size = x.shape[2:]
    return torch.cat(
      [x]
      + [
        F.interpolate(f(x), size, mode='bilinear', align_corners=align_corners)
        for f in self.features
      ],
      1,
    )


class TorchResNet(nn.Module):
  """Backbone with semseg's attribute names: layer0 (stem Sequential), layer1..layer4."""

  def __init__(
    self, depth=50, stem='deep', output_stride=8, contract_dilation=False, base_width=64
  ):
    super().__init__()
    block = Bottle if depth >= 50 else Basic
    w = base_width
    if stem == 'torchvision':
      self.layer0 = nn.Sequential(
        nn.Conv2d(3, w, 7, 2, 3, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
      )
      inplanes = w
    else:
      a, b, c = (w, w, 2 * w) if stem == 'deep' else (w // 2, w // 2, w)
      self.layer0 = nn.Sequential(
        nn.Conv2d(3, a, 3, 2, 1, bias=False),
        nn.BatchNorm2d(a),
        nn.ReLU(inplace=True),
        nn.Conv2d(a, b, 3, 1, 1, bias=False),
        nn.BatchNorm2d(b),
        nn.ReLU(inplace=True),
        nn.Conv2d(b, c, 3, 1, 1, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
      )
      inplanes = c
    strides = {8: (1, 2, 1, 1), 16: (1, 2, 2, 1)}[output_stride]
    dilations = {8: (1, 1, 2, 4), 16: (1, 1, 1, 2)}[output_stride]
    for k in range(4):
      planes = w * 2**k
      s, d = strides[k], dilations[k]
      d0 = d // 2 if contract_dilation and d > 1 else d
      ds = None
      if s != 1 or inplanes != planes * block.expansion:
        ds = nn.Sequential(
          nn.Conv2d(inplanes, planes * block.expansion, 1, s, bias=False),
          nn.BatchNorm2d(planes * block.expansion),
        )
      blocks = [block(inplanes, planes, s, d0, ds)]
      inplanes = planes * block.expansion
      blocks += [block(inplanes, planes, 1, d, None) for _ in range(1, LAYERS[depth][k])]
      setattr(self, f'layer{k + 1}', nn.Sequential(*blocks))
    self.channels = inplanes

  def forward(self, x):
    x = self.layer1(self.layer0(x))
    x = self.layer2(x)
    x3 = self.layer3(x)
    return x3, self.layer4(x3)


class TorchPSPNet(nn.Module):
  """semseg's PSPNet: keys layer0..layer4, ppm.features.i.{1,2}, cls.{0,1,4}, aux.{0,1,4}."""

  def __init__(
    self,
    num_classes=150,
    depth=50,
    stem='deep',
    output_stride=8,
    contract_dilation=False,
    align_corners=True,
    bins=(1, 2, 3, 6),
    base_width=64,
    head_channels=512,
    aux_channels=256,
    dropout=0.1,
  ):
    super().__init__()
    net = TorchResNet(depth, stem, output_stride, contract_dilation, base_width)
    for k in range(5):
      setattr(self, f'layer{k}', getattr(net, f'layer{k}'))
    fea = net.channels
    c3 = fea // 2
    self.align_corners = align_corners
    self.ppm = PPM(fea, fea // len(bins), bins)
    fea *= 2
    self.cls = nn.Sequential(
      nn.Conv2d(fea, head_channels, 3, padding=1, bias=False),
      nn.BatchNorm2d(head_channels),
      nn.ReLU(inplace=True),
      nn.Dropout2d(dropout),
      nn.Conv2d(head_channels, num_classes, 1),
    )
    self.aux = nn.Sequential(
      nn.Conv2d(c3, aux_channels, 3, padding=1, bias=False),
      nn.BatchNorm2d(aux_channels),
      nn.ReLU(inplace=True),
      nn.Dropout2d(dropout),
      nn.Conv2d(aux_channels, num_classes, 1),
    )

  def forward(self, x):
    size = x.shape[2:]
    x = self.layer1(self.layer0(x))
    x = self.layer2(x)
    x3 = self.layer3(x)
    x4 = self.layer4(x3)
    out = self.cls(self.ppm(x4, self.align_corners))
    out = F.interpolate(out, size, mode='bilinear', align_corners=self.align_corners)
    if not self.training:
      return out
    aux = F.interpolate(self.aux(x3), size, mode='bilinear', align_corners=self.align_corners)
    return out, aux


def randomize(model: nn.Module, seed: int = 0, calibration: torch.Tensor | None = None):
  """Random weights and non-trivial BN running statistics.

  Conv weights: He normal. BN affine: weight ~ U(0.5, 1.5), bias ~ N(0, 0.1). Running
  statistics: measured on ``calibration`` images (cumulative average) so activations stay
  well scaled through 50+ layers, then perturbed (mean + N(0, 0.05), var * U(0.8, 1.25)) so
  they differ from any batch's own statistics.
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_out) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        m.momentum = None  # cumulative average during calibration
        m.reset_running_stats()
    if calibration is None:
      calibration = torch.randn(2, 3, 49, 49, generator=g)
    model.train()
    model(calibration)
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.momentum = 0.1
        m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g) * 0.05)
        m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) * 0.45 + 0.8)
  model.eval()
  return model


def state_dict_numpy(model: nn.Module) -> dict:
  return {
    k: v.detach().cpu().numpy()
    for k, v in model.state_dict().items()
    if not k.endswith('num_batches_tracked')
  }
