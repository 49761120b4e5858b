# Centering/sharpening study on Fashion-MNIST: the demo preset for 2 epochs (1,874 steps, ~ shapes10's
# 2,028), the last layer frozen for 0.17 epoch (~159 steps, as the preset's 1 of 13 epochs on shapes10).
from fdino.sweep.runner import run_sweep
from fdino.sweep.spec import study_spec

spec = study_spec(
    "centering-sharpening",
    seeds=(0, 1, 2),
    config=(("epochs", 2), ("freeze_last_layer", 0.17)),
    options=(("data", "fashion-mnist"), ("eval_every", 312), ("compile", True), ("workers", 2)),
)
run_sweep(spec, "runs/sweep-cs-fmnist", batched="on")
