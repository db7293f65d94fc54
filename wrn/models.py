"""The networks this folder trains: WRN-d-k against WRN-d-k (the WRN code is wrn_mobi/models.py's too).

Each returns its classifiers' logits shallow to deep, its own (final) one last: [aux1, aux2, final] with
aux=True, [final] with aux=False. The auxiliary classifiers are the sub-modules aux1 and aux2, so an aux=False
model loads an aux=True model's backbone: the deployed network has no extra parameters."""
import torch
import torch.nn as nn
import torch.nn.functional as F


# --- Wide ResNet (Zagoruyko & Komodakis), pre-activation, no dropout ----------------------------

class PreActBlock(nn.Module):
    """o1 = relu(bn0(x)); out = conv3x3(relu(bn1(conv3x3(o1, stride)))) + (conv1x1(o1, stride) or x)."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        needs_projection = in_channels != out_channels or stride != 1
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False) if needs_projection else None

    def forward(self, x):
        o1 = F.relu(self.bn0(x))
        z = self.conv1(F.relu(self.bn1(self.conv0(o1))))
        return z + (self.shortcut(o1) if self.shortcut is not None else x)


def wrn_group(in_channels, out_channels, num_blocks, stride):
    """num_blocks blocks; the first one changes width and resolution."""
    return nn.Sequential(*[PreActBlock(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1)
                           for i in range(num_blocks)])


class Head(nn.Module):
    """BN - ReLU - global average pooling (8x8 here) - FC: a WRN's classifier; without `bn`, the MobileNet's."""

    def __init__(self, channels, num_classes, bn=True):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels) if bn else None
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(x)) if self.bn is not None else x
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class WideResNet(nn.Module):
    """WRN-d-k: conv0, three groups of n = (d-4)/6 blocks of widths (16k, 32k, 64k), head. aux1 from group0
    (n blocks to 32k, n//2 to 64k, both stride 2, a head), aux2 from group1 (n blocks to 128k, stride 2, a head)."""

    def __init__(self, depth, width, num_classes, aux):
        super().__init__()
        n = (depth - 4) // 6
        w0, w1, w2 = 16 * width, 32 * width, 64 * width
        self.conv0 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.group0 = wrn_group(16, w0, n, 1)
        self.group1 = wrn_group(w0, w1, n, 2)
        self.group2 = wrn_group(w1, w2, n, 2)
        self.head = Head(w2, num_classes)
        self.aux1 = self.aux2 = None
        if aux:
            self.aux1 = nn.Sequential(wrn_group(w0, w1, n, 2), wrn_group(w1, w2, n // 2, 2), Head(w2, num_classes))
            self.aux2 = nn.Sequential(wrn_group(w1, 2 * w2, n, 2), Head(2 * w2, num_classes))
        init_wrn_weights(self)

    def forward(self, x):
        g0 = self.group0(self.conv0(x))
        g1 = self.group1(g0)
        final = self.head(self.group2(g1))
        return [final] if self.aux1 is None else [self.aux1(g0), self.aux2(g1), final]


def init_wrn_weights(model):
    """Kaiming-normal (fan_in) convs and FC weights, zero FC bias, BN weight ~ U[0, 1), BN bias 0."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.0, 1.0)
            nn.init.zeros_(module.bias)


def wrn(depth=28, width=10, num_classes=100, aux=True):
    """WRN-depth-width; depth must be 6n+4, and at least 16 to carry the auxiliary classifiers."""
    if depth < 10 or (depth - 4) % 6 != 0 or width < 1:
        raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...) and width >= 1, got {depth} and {width}")
    if aux and depth < 16:
        raise ValueError(f"WRN-{depth} is too shallow for the auxiliary classifiers: use depth >= 16, or aux=False")
    return WideResNet(depth, width, num_classes, aux)


def build_pair(depth, width, num_classes, aux):
    """Net 1 and net 2: WRN-depth-width twice."""
    return wrn(depth, width, num_classes, aux), wrn(depth, width, num_classes, aux)


def pair_names(depth, width):
    return f"wrn-{depth}-{width}", f"wrn-{depth}-{width}"


# Net 1, net 2: does the published code test it in train mode (BN on each test batch)? Not in its wrn/.
PUBLISHED_TEST_USES_BATCH_STATISTICS = (False, False)
