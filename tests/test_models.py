import pytest
import torch

from sslprune.errors import UserError
from sslprune.models import build_model, load_torchvision_state_dict

# Backbone parameter counts (no classifier). References: torchvision's resnet18 (11,689,512) and
# resnet50 (25,557,032) and alexnet (61,100,840) minus their 1000-way classifiers; the CIFAR
# ResNet-18 (11,173,962 with a 10-way fc) minus 5,130; VGG-19-BN with bias-free convs
# (20,035,018 with a 10-way fc) minus 5,130; ResNet-20 with 1x1 projection shortcuts:
# 270,256 conv weights + 1,568 batch-norm parameters.
COUNTS = {"resnet18": 11_176_512, "resnet50": 23_508_032, "alexnet": 57_003_840,
          "resnet18_cifar": 11_168_832, "vgg19": 20_029_888, "resnet20": 271_824, "convnet": 93_472}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts(name):
    m = build_model(name)
    assert sum(p.numel() for p in m.parameters()) == COUNTS[name]


@pytest.mark.parametrize("name,size,dim", [("convnet", 8, 128), ("resnet20", 32, 64),
                                           ("resnet18_cifar", 32, 512), ("vgg19", 32, 512)])
def test_backbones_return_features(name, size, dim):
    m = build_model(name).eval()
    assert m(torch.randn(2, 3, size, size)).shape == (2, dim) and m.feature_dim == dim


def test_unknown_model_lists_valid_names():
    with pytest.raises(UserError, match="resnet50"):
        build_model("resnet51")


def test_resnet50_has_torchvision_keys():
    sd = build_model("resnet50").state_dict()
    assert len(sd) + 2 == 320  # torchvision's resnet50 state dict has 320 entries with fc.weight/bias
    for key, shape in {"conv1.weight": (64, 3, 7, 7), "bn1.running_mean": (64,),
                       "layer1.0.downsample.0.weight": (256, 64, 1, 1),
                       "layer1.0.downsample.1.num_batches_tracked": (),
                       "layer2.0.conv2.weight": (128, 128, 3, 3),   # stride on the 3x3 (v1.5)
                       "layer4.2.conv3.weight": (2048, 512, 1, 1), "layer4.2.bn3.bias": (2048,)}.items():
        assert tuple(sd[key].shape) == shape, key


def test_torchvision_state_dict_loads_strictly(tmp_path):
    src = build_model("resnet50")
    sd = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
          for k, v in src.state_dict().items()}
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    torch.save(sd, tmp_path / "tv.pth")
    dst = build_model("resnet50")
    head = load_torchvision_state_dict(dst, tmp_path / "tv.pth")
    assert set(head) == {"fc.weight", "fc.bias"}
    assert all(torch.equal(dst.state_dict()[k], sd[k]) for k in dst.state_dict())
    del sd["layer3.1.conv1.weight"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="missing"):
        load_torchvision_state_dict(build_model("resnet50"), tmp_path / "bad.pth")
