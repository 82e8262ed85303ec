"""Small models for tests (re-exported from ftkernels.bench.models)."""

from ftkernels.bench.models import BasicBlock, ResNet18, resnet18  # noqa: F401
