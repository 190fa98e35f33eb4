"""Input storage: CID (local cache, content store, IPFS), URL download, inline, local dirs."""

from shoal_compute.inputs.errors import InputError, InputUnavailable
from shoal_compute.inputs.fetcher import InputConfig, InputFetcher
from shoal_compute.inputs.paths import check_output_name, check_target

__all__ = [
    "InputConfig",
    "InputError",
    "InputFetcher",
    "InputUnavailable",
    "check_output_name",
    "check_target",
]
