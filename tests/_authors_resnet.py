"""The SN authors' zoo models, written from the published description
(``shared/reference/switchable-norm.md``: module names, layout and SN
numerics), independent of mmsn, for checking the checkpoint converter.

* SN: unbiased IN variance, LN/BN statistics derived from the IN ones,
  gamma/beta of shape (1, C, 1, 1), importance logits [IN, LN(, BN)],
  running statistics of shape (1, C, 1) used by the BN branch in eval.
* ``resnetv1sn{50,101}``: conv1, sn1, ReLU, maxpool; Bottleneck blocks with
  conv1/sn1, conv2/sn2 (stride), conv3/sn3 and a shortcut Sequential
  ``downsample.0`` (1x1 conv) / ``downsample.1`` (SN); 7x7 average pool,
  dropout 0.5, fc.
* ``resnetv2sn{50,101}``: the same stem; pre-activation blocks (SN -> ReLU
  -> conv, three times) whose shortcut is a bare 1x1 ``nn.Conv2d`` assigned
  to ``downsample`` (no norm), applied to the pre-activated input; ``sn_out``
  + ReLU after layer4; pool, dropout, fc.
"""
import torch
import torch.nn.functional as F
from torch import nn

STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class RefSwitchNorm2d(nn.Module):
    """SN of the reference implementation (its eval numerics)."""

    def __init__(self, channels, using_bn=True, eps=1e-5):
        super().__init__()
        self.using_bn = using_bn
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        branches = 3 if using_bn else 2
        self.mean_weight = nn.Parameter(torch.ones(branches))
        self.var_weight = nn.Parameter(torch.ones(branches))
        if using_bn:
            self.register_buffer('running_mean', torch.zeros(1, channels, 1))
            self.register_buffer('running_var', torch.zeros(1, channels, 1))

    def forward(self, x):
        n, c, h, w = x.shape
        x = x.view(n, c, -1)
        mean_in = x.mean(-1, keepdim=True)
        var_in = x.var(-1, keepdim=True)  # unbiased, as the authors
        second = var_in + mean_in**2
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = second.mean(1, keepdim=True) - mean_ln**2
        w_mean = F.softmax(self.mean_weight, 0)
        w_var = F.softmax(self.var_weight, 0)
        mean = w_mean[0] * mean_in + w_mean[1] * mean_ln
        var = w_var[0] * var_in + w_var[1] * var_ln
        if self.using_bn:
            if self.training:
                mean_bn = mean_in.mean(0, keepdim=True)
                var_bn = second.mean(0, keepdim=True) - mean_bn**2
            else:
                mean_bn, var_bn = self.running_mean, self.running_var
            mean = mean + w_mean[2] * mean_bn
            var = var + w_var[2] * var_bn
        x = (x - mean) / (var + self.eps).sqrt()
        return x.view(n, c, h, w) * self.weight + self.bias


def conv(cin, cout, k, stride=1):
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False)


class RefBottleneckV1(nn.Module):

    def __init__(self, inplanes, planes, stride, downsample, using_bn,
                 norm_layer=RefSwitchNorm2d):
        super().__init__()
        self.conv1 = conv(inplanes, planes, 1)
        self.sn1 = norm_layer(planes, using_bn)
        self.conv2 = conv(planes, planes, 3, stride)
        self.sn2 = norm_layer(planes, using_bn)
        self.conv3 = conv(planes, planes * 4, 1)
        self.sn3 = norm_layer(planes * 4, using_bn)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.sn1(self.conv1(x)))
        out = self.relu(self.sn2(self.conv2(out)))
        out = self.sn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class RefBottleneckV2(nn.Module):
    """Pre-activation: SN -> ReLU -> conv; the shortcut conv (no norm) takes
    the pre-activated input."""

    def __init__(self, inplanes, planes, stride, downsample, using_bn,
                 norm_layer=RefSwitchNorm2d):
        super().__init__()
        self.sn1 = norm_layer(inplanes, using_bn)
        self.conv1 = conv(inplanes, planes, 1)
        self.sn2 = norm_layer(planes, using_bn)
        self.conv2 = conv(planes, planes, 3, stride)
        self.sn3 = norm_layer(planes, using_bn)
        self.conv3 = conv(planes, planes * 4, 1)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.sn1(x))
        identity = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.sn2(out)))
        out = self.conv3(self.relu(self.sn3(out)))
        return out + identity


class RefResNet(nn.Module):
    """``resnetv{1,2}sn{50,101}`` of the authors' zoo (names and numerics).

    Args:
        version (int): 1 (post-activation) or 2 (pre-activation).
        depth (int): 50 or 101.
        using_bn (bool): SN with or without the BN branch.
        norm_layer (callable): ``norm_layer(channels, using_bn)``; the SN
            above by default (another zoo, e.g. sparse SN, passes its own).
    """

    def __init__(self,
                 version=1,
                 depth=50,
                 using_bn=True,
                 num_classes=1000,
                 norm_layer=RefSwitchNorm2d):
        super().__init__()
        block = RefBottleneckV1 if version == 1 else RefBottleneckV2
        self.version = version
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.sn1 = norm_layer(64, using_bn)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        stages = zip((64, 128, 256, 512), STAGE_BLOCKS[depth])
        for i, (planes, num) in enumerate(stages):
            stride = 1 if i == 0 else 2
            if version == 1:
                downsample = nn.Sequential(
                    conv(inplanes, planes * 4, 1, stride),
                    norm_layer(planes * 4, using_bn))
            else:
                downsample = conv(inplanes, planes * 4, 1, stride)
            layers = [
                block(inplanes, planes, stride, downsample, using_bn,
                      norm_layer)
            ]
            inplanes = planes * 4
            layers += [
                block(inplanes, planes, 1, None, using_bn, norm_layer)
                for _ in range(num - 1)
            ]
            setattr(self, f'layer{i + 1}', nn.Sequential(*layers))
        if version == 2:
            self.sn_out = norm_layer(inplanes, using_bn)
        self.avgpool = nn.AvgPool2d(7, stride=1)
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.sn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f'layer{i}')(x)
        if self.version == 2:
            x = self.relu(self.sn_out(x))
        x = self.avgpool(x).flatten(1)
        return self.fc(self.dropout(x))


def randomize(model, seed):
    """Random weights, importance logits and running statistics.

    The last layer of each residual branch is damped (gamma of v1's sn3 in
    [0.1, 0.3], v2's conv3 x 0.2), as training with last_gamma leaves it:
    otherwise the residual stream of a random 101-layer net grows until the
    fp32 rounding of any two implementations differs by ~1e-5 in the logits.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=gen) *
                    (2 / fan_in)**0.5)
            elif isinstance(module, nn.Linear):
                bound = module.in_features**-0.5
                module.weight.copy_(
                    (torch.rand(module.weight.shape, generator=gen) * 2 - 1) *
                    bound)
                module.bias.copy_(
                    (torch.rand(module.bias.shape, generator=gen) * 2 - 1) *
                    bound)
            elif isinstance(module, RefSwitchNorm2d):
                c = module.weight.shape[1]
                module.weight.copy_(
                    torch.rand((1, c, 1, 1), generator=gen) + 0.5)
                module.bias.copy_(
                    torch.randn((1, c, 1, 1), generator=gen) * 0.1)
                module.mean_weight.copy_(
                    torch.randn(module.mean_weight.shape, generator=gen))
                module.var_weight.copy_(
                    torch.randn(module.var_weight.shape, generator=gen))
                if module.using_bn:
                    module.running_mean.copy_(
                        torch.randn((1, c, 1), generator=gen) * 0.2)
                    module.running_var.copy_(
                        torch.rand((1, c, 1), generator=gen) + 0.5)
        for module in model.modules():
            if isinstance(module, RefBottleneckV1):
                module.sn3.weight.copy_(
                    torch.rand(module.sn3.weight.shape, generator=gen) * 0.2 +
                    0.1)
            elif isinstance(module, RefBottleneckV2):
                module.conv3.weight.mul_(0.2)
    return model.eval()


def save_authors_checkpoint(model, path, name, best_prec1=77.49):
    """The authors' file layout: 'module.' keys and training metadata."""
    torch.save(
        dict(
            epoch=100,
            model=name,
            state_dict={
                f'module.{k}': v
                for k, v in model.state_dict().items()
            },
            best_prec1=torch.tensor(best_prec1),
            optimizer=dict(
                state={},
                param_groups=[dict(lr=0.0, momentum=0.9, params=[0, 1])])),
        path)
