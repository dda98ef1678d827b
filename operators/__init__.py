"""Thin App faces over the SDK: each operator calls one SDK function of the same name."""

from fiftyone_diffusion.operators.ddpm import GenerateDdpmSamples, TrainClassifier, TrainDdpm
from fiftyone_diffusion.operators.mnist import LoadMnist

OPERATORS = [LoadMnist, TrainClassifier, TrainDdpm, GenerateDdpmSamples]
