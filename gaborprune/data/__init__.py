"""Datasets by spec string, all offline: cifar10:DIR, cifar100:DIR, imagefolder:DIR, digits, fake:N.

Small sets (digits, CIFAR, fake) become `TensorData`: uint8 images that live on the training device
and are augmented there in whole batches, so a GPU never waits on a CPU loader. ImageFolder trees
use DataLoader workers with pinned memory (`FolderData`).
"""

from gaborprune.data.specs import DataError, DataSpec, load_data
from gaborprune.data.tensor import TensorData, calibration_batches

__all__ = ["DataError", "DataSpec", "TensorData", "calibration_batches", "load_data"]
