"""Images, identity folders, trial lists, decoded-face caches and augmentation (no models)."""

from facelab.data.folders import IdentityFolder, Sample, split_identities, split_images
from facelab.data.images import ImageError, decode_image, read_image
from facelab.data.trials import Trial, read_lfw_pairs, read_people, read_trial_csv, read_trials

__all__ = [
    "IdentityFolder",
    "ImageError",
    "Sample",
    "Trial",
    "decode_image",
    "read_image",
    "read_lfw_pairs",
    "read_people",
    "read_trial_csv",
    "read_trials",
    "split_identities",
    "split_images",
]
