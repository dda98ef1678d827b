"""App panels."""

from fiftyone_diffusion.panels.generation_overview import GenerationOverviewPanel
from fiftyone_diffusion.panels.noise_trajectory import NoiseTrajectoryPanel

PANELS: list = [NoiseTrajectoryPanel, GenerationOverviewPanel]
