"""SuperPointNet_gauss2: the reference's network (a U-Net-style VGG encoder with BatchNorm, a
65-channel detector head and a 256-channel descriptor head), with its parameter names, so that its
checkpoints load unchanged."""
import torch
import torch.nn.functional as F
from torch import nn

from models.unet_parts import down, inconv


class SuperPointNet_gauss2(nn.Module):  # noqa: N801 (reference name)
    """Image (B, 1, H, W), H and W multiples of 8 -> {'semi': (B, 65, H/8, W/8) detector logits,
    'desc': (B, 256, H/8, W/8) unit-norm descriptors}.

    `dustbin_prior` (0 = the reference's initialisation) starts the "no keypoint" logit that many
    nats above the 64 position logits, as a prior that most cells hold no corner: a run from scratch
    then begins at the loss of a sensible detector instead of log(65) and learns corners far sooner.
    It only sets the initial BatchNorm bias; the weights' layout is unchanged.
    """

    def __init__(self, subpixel_channel: int = 1, dustbin_prior: float = 0.0):
        super().__init__()
        c1, c2, c3, c4, c5, d1 = 64, 64, 128, 128, 256, 256
        det_h = 65
        self.inc = inconv(1, c1)
        self.down1 = down(c1, c2)
        self.down2 = down(c2, c3)
        self.down3 = down(c3, c4)
        self.relu = nn.ReLU(inplace=True)
        # Detector head.
        self.convPa = nn.Conv2d(c4, c5, kernel_size=3, stride=1, padding=1)
        self.bnPa = nn.BatchNorm2d(c5)
        self.convPb = nn.Conv2d(c5, det_h, kernel_size=1, stride=1, padding=0)
        self.bnPb = nn.BatchNorm2d(det_h)
        # Descriptor head.
        self.convDa = nn.Conv2d(c4, c5, kernel_size=3, stride=1, padding=1)
        self.bnDa = nn.BatchNorm2d(c5)
        self.convDb = nn.Conv2d(c5, d1, kernel_size=1, stride=1, padding=0)
        self.bnDb = nn.BatchNorm2d(d1)
        with torch.no_grad():
            self.bnPb.bias[det_h - 1] = dustbin_prior

    def forward(self, x: torch.Tensor) -> dict:
        x4 = self.down3(self.down2(self.down1(self.inc(x))))
        semi = self.bnPb(self.convPb(self.relu(self.bnPa(self.convPa(x4)))))
        desc = self.bnDb(self.convDb(self.relu(self.bnDa(self.convDa(x4)))))
        return {"semi": semi, "desc": F.normalize(desc.float(), p=2, dim=1)}
