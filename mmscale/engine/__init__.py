"""The only package that imports deepspeed or talks to ranks: setup, gathers, train loop, checkpoints."""
