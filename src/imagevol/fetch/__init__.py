"""Fetching: the pull plan (`plan`), the fetcher (`fetcher`), a layer handed on as it downloads
(`stream`), large blobs fetched in pieces (`pieces`) and the export of a pull to an OCI layout
(`export`)."""

from .export import export_layout
from .plan import PullPlan, PullResult, plan_pull, pull
from .stream import LayerStream

__all__ = ["LayerStream", "PullPlan", "PullResult", "export_layout", "plan_pull", "pull"]
