"""REFILLED's two losses inside a plain PyTorch training loop of your own.

A teacher knows the digits 0-4; a student learns the digits 5-9 from 10 images each (cross-task:
no class in common). Run: python examples/own_loop.py [--epochs 30]
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

import refilled

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=30)
args = parser.parse_args()
torch.manual_seed(0)
d = load_digits()
x, y = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16, torch.tensor(d.target)


def mlp(classes):  # embedding = the input of the last Linear (64-d)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, classes))


teacher = mlp(5)  # stands for your trained teacher: here a quick fit on digits 0-4
opt = torch.optim.Adam(teacher.parameters(), 1e-2)
for _ in range(100):
    opt.zero_grad(); F.cross_entropy(teacher(x[y < 5]), y[y < 5]).backward(); opt.step()
teacher.eval()

new = (y >= 5).nonzero().flatten()
train, test = new[torch.randperm(len(new))[:50]], new[50:]  # 50 images (about 10 per class)
xs, ys = x[train], y[train] - 5
student, backbone = mlp(5), lambda net, v: net[:-1](v)
relation, local = refilled.RelationMatchingLoss(tau=4.0), refilled.LocalClassifierLoss(tau_teacher=1.0)
with torch.no_grad():
    centers = refilled.class_centers(backbone(teacher, xs), ys, 5)  # teacher centres, student classes

for stage in (1, 2):
    if stage == 2:
        student[-1] = nn.Linear(64, 5)  # a fresh classifier for stage 2
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    for _ in range(args.epochs):
        for idx in torch.randperm(50).split(25):
            with torch.no_grad():
                t_emb = backbone(teacher, xs[idx])
            if stage == 1:  # match the teacher's relations on the student's hard tuples
                loss = relation(backbone(student, xs[idx]), t_emb, ys[idx])
            else:  # CE + the teacher's embedding-induced local classifier, instance-weighted
                logits = student(xs[idx])
                w = refilled.teacher_instance_weights(teacher[-1](t_emb))
                loss = F.cross_entropy(logits, ys[idx]) + local(logits, t_emb, ys[idx], centers, w)
            opt.zero_grad(); loss.backward(); opt.step()
acc = (student(x[test]).argmax(1) == y[test] - 5).float().mean().item()
print(f"student test accuracy on digits 5-9: {100 * acc:.1f}%")
