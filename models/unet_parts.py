"""Encoder blocks of SuperPointNet_gauss2. Module and attribute names are those of the reference so
that its checkpoints' keys (`inc.conv.conv.0.weight`, `down1.mpconv.1.conv.0.weight`, ...) load."""
from torch import nn


class double_conv(nn.Module):  # noqa: N801 (reference name, part of the checkpoint keys)
    """[conv 3x3 -> BatchNorm -> ReLU] x 2."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.conv(x)


class inconv(nn.Module):  # noqa: N801
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = double_conv(in_ch, out_ch)

    def forward(self, x):
        return self.conv(x)


class down(nn.Module):  # noqa: N801
    """max-pool 2 -> double_conv."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.mpconv = nn.Sequential(nn.MaxPool2d(2), double_conv(in_ch, out_ch))

    def forward(self, x):
        return self.mpconv(x)
