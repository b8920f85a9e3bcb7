"""
The layer study of your own model
=================================

Train a small convolutional network of your own on the built-in digits (8 x 8 images, no
download), then compare the Hessian of every layer's block with the Hessian of the whole
network: top eigenvalues, traces, eigenvalue densities, and how close each layer's spectrum
is to the full one (Wasserstein-1 between the spectra, each scaled by its own top eigenvalue).
"""

import matplotlib.pyplot as plt
import torch
from torch import nn

from hesslens.analysis import layer_study
from hesslens.zoo import analysis_subset, load_dataset

torch.manual_seed(0)

# %%
# Your model and a short training
# -------------------------------
# Any ``nn.Module`` will do; hesslens finds its layers (the modules that own parameters).

model = nn.Sequential(
    nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
    nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
)
data = load_dataset("digits")
loss_fn = nn.functional.cross_entropy
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
for _epoch in range(8):
    for i in range(0, len(data.y_train), 64):
        opt.zero_grad()
        loss_fn(model(data.x_train[i:i + 64]), data.y_train[i:i + 64]).backward()
        opt.step()
with torch.no_grad():
    accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
print(f"test accuracy {100 * accuracy:.1f} %")

# %%
# The study
# ---------
# The Hessian is that of the mean loss over a fixed subset: 10 training examples per class,
# as in Sankar et al. (AAAI 2021).

x, y = analysis_subset(data.x_train, data.y_train, per_class=10, seed=0)
study = layer_study(model.eval(), loss_fn, (x, y), k=3, density_probes=1, density_steps=40,
                    gauss_newton=False, seed=0, progress=False)

print(f"{'layer':<8} {'params':>6} {'depth':>5} {'lambda_1':>9} {'trace':>9} {'W1 to full':>10}")
for entry in [study.full, *study.layers.values()]:
    w1 = (entry.similarity or {}).get("wasserstein")
    print(f"{entry.name:<8} {entry.n_params:>6} {getattr(entry, 'depth', float('nan')):>5.2f} "
          f"{entry.top_eigenvalue:>9.4g} {entry.trace:>9.4g} "
          f"{'' if w1 is None else format(w1, '.4f'):>10}")
print("most similar to the full spectrum:", ", ".join(study.similarity["most_similar"]))
print("checks:", {k: v for k, v in study.checks().items() if isinstance(v, bool)})

# %%
# Densities, each scaled by its own top eigenvalue
# ------------------------------------------------
# A bulk near zero and a few outliers, for the full Hessian as for each layer's block.

fig, ax = plt.subplots(figsize=(6.4, 3.6))
for entry in [study.full, *study.layers.values()]:
    density = entry.density
    scale = max(abs(float(density.nodes.min())), abs(float(density.nodes.max())))
    ax.plot(density.nodes / scale, density.weights, marker="o", ms=3, lw=1,
            label=entry.name, color="black" if entry is study.full else None)
ax.set_yscale("log")
ax.set_xlabel("eigenvalue / largest |eigenvalue|")
ax.set_ylabel("weight (SLQ)")
ax.legend(fontsize=8, ncol=3)
fig.tight_layout()
