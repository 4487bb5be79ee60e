"""The v2 HTTP/REST front end (Triton's and KServe's REST protocol) over the one inference core."""

from .server import HttpFrontEnd, start_http

__all__ = ["HttpFrontEnd", "start_http"]
