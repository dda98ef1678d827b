"""Thin App faces over the SDK: each operator calls one SDK function of the same name."""

from fiftyone_diffusion.operators.clip import (
    BuildSimilarityIndex,
    ComputeClipEmbeddings,
    Search,
    TrainClip,
    ZeroShotClassify,
)
from fiftyone_diffusion.operators.ddpm import GenerateDdpmSamples, TrainClassifier, TrainDdpm
from fiftyone_diffusion.operators.mnist import LoadMnist
from fiftyone_diffusion.operators.sdxl import GenerateSdxlSamples
from fiftyone_diffusion.operators.trajectory import ComputeForwardTrajectory

OPERATORS = [LoadMnist, TrainClassifier, TrainDdpm, GenerateDdpmSamples, ComputeForwardTrajectory, GenerateSdxlSamples,
             TrainClip, ComputeClipEmbeddings, BuildSimilarityIndex, Search, ZeroShotClassify]
