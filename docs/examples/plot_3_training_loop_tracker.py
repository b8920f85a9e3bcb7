"""
Curvature in your training loop
===============================

:class:`hesslens.CurvatureTracker` records the top eigenvalues and the trace of the full
Hessian and of every layer's block on a fixed analysis set, in any training loop, without
changing the training: it works on a private copy and puts back the random states.
"""

import tempfile

import matplotlib.pyplot as plt
import torch

import hesslens as hl

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
x, y = torch.randn(256, 10), torch.randint(0, 3, (256,))
loss_fn = torch.nn.functional.cross_entropy
opt = torch.optim.SGD(model.parameters(), lr=0.5)

out = tempfile.mkdtemp()  # curvature.json and curvature.csv grow there as records are made
tracker = hl.CurvatureTracker(model, loss_fn, (x[:64], y[:64]), out=out, every=10)
for step in range(61):
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    tracker.update(step)  # records at steps 0, 10, 20, ...

print([record["step"] for record in tracker.history])

# %%
# The top eigenvalue of the full Hessian and of each layer over training
# ----------------------------------------------------------------------

steps = [r["step"] for r in tracker.history]
fig, ax = plt.subplots(figsize=(6.4, 3.6))
ax.plot(steps, [r["full"]["top_eigenvalues"][0] for r in tracker.history], color="black",
        lw=2, marker="o", label="full network")
for name in tracker.history[0]["layers"]:
    ax.plot(steps, [r["layers"][name]["top_eigenvalues"][0] for r in tracker.history],
            marker="o", ms=3, label=f"layer {name}")
ax.set_xlabel("step")
ax.set_ylabel("top Hessian eigenvalue")
ax.legend()
fig.tight_layout()
