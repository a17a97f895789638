"""`dolphin-train plan`: what a run will cost (parameters, steps, per-GPU memory) before it is launched."""
