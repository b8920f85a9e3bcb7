"""
A Hugging Face model's blocks
=============================

A GPT-2 built from a config (nothing is downloaded), its Hessian split into the blocks a
transformer is made of: per layer the query, key and value (slices of the fused ``c_attn``
weight), the attention output, and the two MLP matrices, plus the embeddings and the norms.
The model's own loss is used (``loss_fn=None``).
"""

import matplotlib.pyplot as plt
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

import hesslens as hl

transformers.logging.set_verbosity_error()  # a tiny config: no notes about its token ids
torch.manual_seed(0)
config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                    bos_token_id=0, eos_token_id=0)
model = GPT2LMHeadModel(config).eval()
ids = torch.randint(0, 50, (4, 3, 8), generator=torch.Generator().manual_seed(0))
batches = [{"input_ids": b, "labels": b} for b in ids]  # four batches of three sequences

H = hl.Hessian(model, None, batches, layers="transformer")
print(len(H.layers), "blocks, e.g.", H.layers[3:7])

# %%
# Top eigenvalue of the whole Hessian and of one block
# ----------------------------------------------------
# A block is a diagonal block of the Hessian: its top eigenvalue is at most the full one's
# (Cauchy interlacing).

full = H.eigenvalues(k=2, seed=0)
value = H.block("transformer.h.0.attn.v").eigenvalues(k=1, seed=0)
print("full:", full.values.tolist(), "converged:", full.converged.tolist())
print("h.0.attn.v:", value.values.tolist())

# %%
# Every block's top eigenvalue
# ----------------------------
# How unlike one another the blocks are: the embeddings and norms against the attention and
# MLP matrices, each below the full Hessian's top eigenvalue.

tops = {name: H.block(name).eigenvalues(k=1, seed=0).values[0].item() for name in H.layers}
assert all(t <= full.values[0].item() * (1 + 1e-6) for t in tops.values())  # interlacing

names = [n.replace("transformer.", "") for n in tops]
fig, ax = plt.subplots(figsize=(7.0, 3.4))
ax.bar(range(len(names)), list(tops.values()), color="tab:blue")
ax.axhline(full.values[0].item(), color="black", lw=1, ls="--", label="full Hessian")
ax.set_xticks(range(len(names)), names, rotation=70, fontsize=7)
ax.set_yscale("symlog", linthresh=1e-3)
ax.set_ylabel("top eigenvalue of the block")
ax.set_title("GPT-2 (2 layers) at initialisation: each block against the whole", fontsize=10)
ax.legend(fontsize=8)
fig.tight_layout()
