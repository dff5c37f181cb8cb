"""Run monitoring: console progress lines and Weights & Biases."""
