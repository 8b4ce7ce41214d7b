"""adtr: anomaly detection by transformer feature reconstruction (ADTR, You et al., ICONIP 2022)."""

__version__ = "0.1.0"

from adtr.detector import ADTRDetector  # noqa: E402
from adtr.predict import Prediction  # noqa: E402

__all__ = ["ADTRDetector", "Prediction", "__version__"]
