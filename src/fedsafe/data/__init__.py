"""Data for federated instruction tuning: sources, records, client partitions, contamination checks.

Typical use::

    from fedsafe.data import DataConfig, build_federation, load_source
    fed = build_federation(DataConfig())          # 7 benign + 3 malicious clients, eval sets held out
    prompts = load_source("strongreject")         # any single source by spec

See :mod:`fedsafe.data.sources` for the spec syntax.
"""

from .config import ClientGroup, DataConfig
from .contamination import Overlap, assert_no_contamination, check_contamination
from .partition import ClientData, Federation, build_federation
from .records import KINDS, Record
from .safe_responses import generated_safe_response_prompt, safe_response
from .sources import list_sources, load_refusal_keywords, load_source, register_source

__all__ = [
    "KINDS", "ClientData", "ClientGroup", "DataConfig", "Federation", "Overlap", "Record",
    "assert_no_contamination", "build_federation", "check_contamination", "generated_safe_response_prompt",
    "list_sources", "load_refusal_keywords", "load_source", "register_source", "safe_response",
]
