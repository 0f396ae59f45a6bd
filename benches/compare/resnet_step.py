"""PyTorch side of benches/resnet_step.rs: ResNet-18 (torchvision layout, built here so that
torchvision is not needed) training-step throughput at batch 16 x 3x64x64, random images,
10 classes, SGD momentum 0.9; the whole network trained, then the backbone frozen (eval-mode
BatchNorm, no gradients, the head trained). Prints images/s for each."""
import argparse
import time

import torch
import torch.nn as nn


class BasicBlock(nn.Module):
    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = x if self.downsample is None else self.downsample(x)
        return self.relu(y + s)


class ResNet18(nn.Module):
    def __init__(self, num_classes=10, width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], width
        for i in range(4):
            planes = width << i
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, planes, stride), BasicBlock(planes, planes, 1)))
            cin = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def measure(frozen, steps, warmup):
    torch.manual_seed(0)
    net = ResNet18()
    if frozen:
        for n, p in net.named_parameters():
            p.requires_grad = n.startswith("fc.")
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    x = torch.randn(16, 3, 64, 64)
    y = torch.arange(16) % 10
    loss_fn = nn.CrossEntropyLoss()

    def step():
        net.train()
        if frozen:
            # Frozen parts stay in evaluation mode, as in wick.
            for name, m in net.named_modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t
    return 16 * steps / dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name, frozen in [("full", False), ("frozen_backbone", True)]:
        ips = measure(frozen, args.steps if not frozen else 3 * args.steps, 5)
        print(f"pytorch {torch.__version__} resnet18 b16 64x64 {name}: {ips:.1f} images/s "
              f"({1000 * 16 / ips:.1f} ms/step, {args.threads} threads)")


if __name__ == "__main__":
    main()
