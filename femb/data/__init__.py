"""Face datasets, pair protocols and the single preprocessing definition.

Every dataset returns ``(image (3, S, S) float32 in [-1, 1], label int)`` and exposes
``num_classes``, ``labels``, ``identities`` and ``paths``; verification sets also expose
``pairs``, ``issame`` and ``folds`` (see :mod:`femb.data.base`).
"""

from femb.data.bad_images import SkipBadImages
from femb.data.base import IMAGE_EXTENSIONS, FaceDataset, ImageReadError, load_image
from femb.data.binfile import BinVerificationDataset, consecutive_folds, read_bin, write_bin
from femb.data.data_root import ENV_VAR, default_data_root
from femb.data.folder import IdentityFolderDataset
from femb.data.lfw import DEFAULT_CENTER_CROP as LFW_CENTER_CROP
from femb.data.lfw import LFWDataset
from femb.data.orl import ORLDataset
from femb.data.pairs import (
    PairRecord,
    PairsDataset,
    PairsProtocol,
    pairs_from_labels,
    read_pairs_file,
)
from femb.data.recordio import RecordIODataset, write_recordio
from femb.data.synthetic import SyntheticFaceDataset
from femb.data.transforms import face_transform

__all__ = [
    "ENV_VAR",
    "IMAGE_EXTENSIONS",
    "LFW_CENTER_CROP",
    "BinVerificationDataset",
    "FaceDataset",
    "IdentityFolderDataset",
    "ImageReadError",
    "LFWDataset",
    "ORLDataset",
    "PairRecord",
    "PairsDataset",
    "PairsProtocol",
    "RecordIODataset",
    "SkipBadImages",
    "SyntheticFaceDataset",
    "consecutive_folds",
    "default_data_root",
    "face_transform",
    "load_image",
    "pairs_from_labels",
    "read_bin",
    "read_pairs_file",
    "write_bin",
    "write_recordio",
]
