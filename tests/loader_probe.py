"""A data set that imports nothing but torch: what a loader worker finds already imported is what its server gave it."""
import sys

import torch
from torch.utils.data import Dataset


class ImportedModules(Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        return torch.tensor(['timm' in sys.modules, 'compress.models' in sys.modules])
