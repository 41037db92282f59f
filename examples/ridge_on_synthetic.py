"""Fit the ridge decoder on one synthetic subject and compare it with the ground truth.

Run: python examples/ridge_on_synthetic.py
"""

import numpy as np

from brainrecon.data import load_dataset
from brainrecon.decoders import get_decoder
from brainrecon.targets import get_target

ds = load_dataset("synthetic")
subject = 1
decoder = get_decoder("ridge", subject=subject, target="pixels").fit(ds.train)
pred = decoder.predict(ds.test)[subject]                      # (n_test, 32, 32, 3)

truth = get_target("pixels").load(ds.test, subject)
r = [np.corrcoef(p.ravel(), t.ravel())[0, 1] for p, t in zip(pred, truth)]
print(f"subject {subject}: mean per-image pixel correlation {np.mean(r):.3f} over {len(r)} test images")
