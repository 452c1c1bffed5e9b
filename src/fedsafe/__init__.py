"""fedsafe: safety attack and defense for federated instruction tuning (FedIT) of LLMs.

Follows Ye et al., "Emerging Safety Attack and Defense in Federated Instruction Tuning of
Large Language Models" (ICLR 2025). See README.md for the data flow and the deviations.
"""

__version__ = "0.1.0"

from .errors import FedsafeError  # noqa: F401
