"""A teacher and a student of your own, used from the command line through import paths.

Neither class follows any refilled contract: refilled takes the input of each one's last
``nn.Linear`` as its embedding, and replaces the student's classifier (``fc``) where needed.

    python examples/my_models.py runs/my_teacher.pt     # train the teacher (plain PyTorch), save its state_dict
    refilled run examples/my_models.yaml teacher.weights=runs/my_teacher.pt
"""
import argparse
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN, STD = 0.5, 0.25  # the input statistics this teacher was trained with (teacher.mean/std)


class Teacher(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class Student(nn.Module):
    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.body(x).mean(dim=(2, 3)))


def small_student(num_classes: int = 5, width: int = 16) -> nn.Module:
    return Student(num_classes, width)


def train_teacher(path: Path, epochs: int = 60) -> None:
    """The teacher learns the digits 0-4 (scikit-learn's 8x8 digits), as any user would."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    keep = d.target < 5
    x = (torch.tensor(d.images[keep], dtype=torch.float32).unsqueeze(1) / 16 - MEAN) / STD
    y = torch.tensor(d.target[keep])
    model = Teacher(5)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    print(f"teacher saved to {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="train the example teacher and save its state_dict")
    parser.add_argument("path", type=Path)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    train_teacher(args.path, args.epochs)
