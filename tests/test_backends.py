"""utils.backends: the one call of the network at a precision and memory layout, shared by training
and inference."""
import pytest
import torch

from models import get_model
from models.extractor import SuperPointExtractor
from utils.backends import TorchBackend, run_network

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fp32_call_equals_the_plain_network_and_keeps_gradients():
    torch.manual_seed(0)
    net = get_model("SuperPointNet_gauss2").eval()
    images = torch.rand(2, 1, 32, 48)
    out = run_network(net, images, "fp32", channels_last=True)
    with torch.no_grad():
        plain = net(images)
    assert set(out) == {"semi", "desc"} and out["semi"].dtype == torch.float32
    for key in ("semi", "desc"):
        assert torch.allclose(out[key], plain[key], atol=1e-5)
    out["semi"].sum().backward()  # training calls it with gradients
    assert net.inc.conv.conv[0].weight.grad is not None


def test_bf16_outputs_come_back_in_fp32_close_to_fp32():
    torch.manual_seed(0)
    net = get_model("SuperPointNet_gauss2").eval()
    images = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        bf16, fp32 = run_network(net, images, "bf16"), run_network(net, images, "fp32")
    assert bf16["semi"].dtype == torch.float32
    assert not torch.equal(bf16["semi"], fp32["semi"])  # it really ran in bf16
    assert torch.allclose(bf16["semi"], fp32["semi"], atol=0.1, rtol=0.05)


def test_backend_settings_and_the_extractor_runs_through_it():
    backend = TorchBackend(get_model("SuperPointNet_gauss2"), "cpu", "fp32", "auto")
    assert backend.channels_last and backend.concrete_precision == "fp32"  # auto: channels-last on the CPU
    with pytest.raises(ValueError, match="fp16"):
        TorchBackend(get_model("SuperPointNet_gauss2"), "cpu", "fp16")
    torch.manual_seed(0)
    extractor = SuperPointExtractor({"channels_last": False})
    images = torch.rand(1, 1, 24, 32)
    with torch.inference_mode():
        expected = run_network(extractor.net, images, "fp32", channels_last=False)
    assert torch.equal(extractor.run_network(images)["semi"], expected["semi"])
