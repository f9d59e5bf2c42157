"""The torchvision-architecture zoo (graphc/models_imagenet.py) at 64x64, batch 2:

- resnet18 and mobilenet_v2 against the same networks written here from torch.nn (torchvision is not a
  dependency): identical state_dict names and shapes, and with the same weights the same logits and
  running statistics in training and in inference mode (float64, 32x32 images);
- every ImageNet model runs forward with a finite loss;
- small variants (tiny widths) of resnet18, mobilenet_v2 and googlenet pass gc.gradcheck in training
  mode (batch norm on batch statistics);
- `graphc summary` prints torchvision's parameter totals.
The numba training step of the full-width models is in tests/test_numba_cnn.py."""
import numpy as np
import pytest

import graphc as gc
from graphc import models, models_imagenet
from graphc.cli import main as cli_main

IMAGE, BATCH = 64, 2


def torch_resnet18(nn, num_classes):
    """torchvision's resnet18, module for module (BasicBlock with its downsample)."""
    class Block(nn.Module):
        def __init__(self, inp, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU()
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = None if stride == 1 and inp == planes else nn.Sequential(
                nn.Conv2d(inp, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

        def forward(self, x):
            skip = x if self.downsample is None else self.downsample(x)
            return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + skip)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU()
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            for i, planes in enumerate((64, 128, 256, 512)):
                inp = 64 if i == 0 else planes // 2
                setattr(self, f"layer{i + 1}", nn.Sequential(Block(inp, planes, 1 if i == 0 else 2),
                                                             Block(planes, planes, 1)))
            self.fc = nn.Linear(512, num_classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(x.mean((2, 3)))
    return Net()


def torch_mobilenet_v2(nn, num_classes):
    """torchvision's mobilenet_v2 (width 1.0), module for module (dropout left out: p = 0)."""
    def cna(inp, out, k, stride=1, groups=1):
        return nn.Sequential(nn.Conv2d(inp, out, k, stride, (k - 1) // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(out), nn.ReLU6())

    class Block(nn.Module):
        def __init__(self, inp, out, stride, t):
            super().__init__()
            hidden = round(inp * t)
            self.res = stride == 1 and inp == out
            layers = [cna(inp, hidden, 1)] if t != 1 else []
            layers += [cna(hidden, hidden, 3, stride, hidden), nn.Conv2d(hidden, out, 1, bias=False),
                       nn.BatchNorm2d(out)]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.res else self.conv(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            feats, inp = [cna(3, 32, 3, 2)], 32
            for t, c, n, s in models_imagenet.MOBILENET_V2_SETTINGS:
                for i in range(n):
                    feats.append(Block(inp, c, s if i == 0 else 1, t))
                    inp = c
            self.features = nn.Sequential(*feats, cna(inp, 1280, 1))
            self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Linear(1280, num_classes))

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3)))
    return Net()


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # on a shared, loaded machine torch's spinning workers cost 10x
    yield torch
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name, make", [("resnet18", torch_resnet18), ("mobilenet_v2", torch_mobilenet_v2)])
def test_same_network_as_torchvision(torch, name, make):
    kw = {"dropout": 0.0} if name == "mobilenet_v2" else {}
    g = models.load(name, num_classes=10, image_size=32, loss=False, dtype="float64", **kw)
    net = make(torch.nn, 10).double()
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    exe = gc.compile(g)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {n: tuple(np.shape(v)) for n, v in exe.state.items()}
    rng = np.random.default_rng(0)
    for n in exe.state:                          # running statistics other than the initial 0 / 1
        if n.endswith("running_mean"):
            exe.state[n] = rng.normal(size=exe.state[n].shape) * 0.1
        elif n.endswith("running_var"):
            exe.state[n] = rng.uniform(0.5, 2.0, size=exe.state[n].shape)
    net.load_state_dict({n: torch.tensor(np.asarray(v)) for n, v in exe.state.items()}, strict=False)
    x = rng.normal(size=(BATCH, 3, 32, 32))
    net.eval()
    want = net(torch.tensor(x)).detach().numpy()
    got = exe.run({"x": x})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
    net.train()                                  # batch statistics; both update their running statistics
    want = net(torch.tensor(x)).detach().numpy()
    got = exe.run({"x": x}, training=True)["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8 * np.abs(want).max())
    for n, v in net.state_dict().items():
        if "running" in n:
            np.testing.assert_allclose(exe.state[n], v.numpy(), rtol=1e-9, atol=1e-12, err_msg=n)


@pytest.mark.parametrize("name", sorted(m.__name__ for m in models_imagenet.MODELS if m.__name__ != "vgg16_bn"))
def test_imagenet_models_run_at_64(name):
    """(vgg16_bn is left out: drawing its 138M initial weights takes seconds; test_zoo checks its shapes.)"""
    g = models.load(name, num_classes=10, image_size=IMAGE)
    rng = np.random.default_rng(1)
    out = gc.compile(g, keep=["logits"]).run({"x": rng.normal(size=(BATCH, 3, IMAGE, IMAGE)).astype(np.float32),
                                              "labels": np.array([1, 7])}, outputs=["loss", "logits"])
    assert out["logits"].shape == (BATCH, 10) and np.isfinite(out["loss"])


# tiny widths at 32x32 (the last feature maps are 1x1: batch norm there sees 2 values per channel), and
# parameters from the stem, the middle and the head. Left out: parameters whose gradient is 0 or nearly
# (a BN shift right before another BN in training mode; a conv feeding a BN over 2 values, whose output
# is then +-1 whatever the weights), where a relative error compares noise with noise.
SMALL_VARIANTS = {
    "resnet18": (dict(width=2), ["conv1.weight", "bn1.weight", "layer2.0.conv1.weight",
                                 "layer2.0.downsample.0.weight", "layer3.1.bn2.weight", "fc.weight", "fc.bias"]),
    "mobilenet_v2": (dict(width_mult=0.25, round_nearest=2),
                     ["features.0.0.weight", "features.1.conv.0.1.weight", "features.9.conv.1.0.weight",
                      "features.9.conv.3.weight", "features.18.1.weight", "classifier.1.weight"]),
    "googlenet": (dict(width_mult=1 / 16),
                  ["conv1.conv.weight", "conv1.bn.weight", "inception3a.branch2.1.conv.weight",
                   "inception4a.branch3.1.bn.weight", "inception4e.branch4.1.conv.weight",
                   "inception5b.branch1.bn.bias", "fc.weight"]),
}


@pytest.mark.parametrize("name", sorted(SMALL_VARIANTS))
def test_small_variants_gradcheck_in_training_mode(name):
    kw, wrt = SMALL_VARIANTS[name]
    g = models.load(name, num_classes=3, image_size=32, dtype="float64", **kw)
    rng = np.random.default_rng(2)
    feeds = {"x": rng.normal(size=(BATCH, 3, 32, 32)), "labels": np.array([0, 2])}
    report = gc.gradcheck(g, feeds, wrt=wrt, training=True, max_elements=3, tol=1e-5)
    assert report.ok and set(report.errors) == set(wrt)
    assert min(float(np.abs(a).max()) for a in report.analytic.values()) > 1e-4     # not a zero gradient


@pytest.mark.parametrize("name, total", [("resnet18", "11,689,512"), ("mobilenet_v2", "3,504,872"),
                                         ("googlenet", "6,624,904"), ("resnet50", "25,557,032")])
def test_graphc_summary_prints_torchvision_totals(capsys, name, total):
    assert cli_main(["summary", name]) == 0
    out = capsys.readouterr().out
    assert f"total trainable parameters: {total}" in out
    assert "non-trainable state:" in out                  # the running statistics, reported apart
