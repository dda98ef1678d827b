"""Names of the DDPM samplers, importable without torch or diffusers (the CLI builds its parser from them)."""

SAMPLERS = ("ddpm", "ddim", "dpmsolver++", "dpmsolver++-sde")
STOCHASTIC_SAMPLERS = ("ddpm", "dpmsolver++-sde")  # draw fresh noise at every step
