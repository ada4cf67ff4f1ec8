"""compress: compression and quantization research harness for efficient vision backbones."""
from compress import models as models  # registers the project's timm models

__version__ = '0.1.0'
