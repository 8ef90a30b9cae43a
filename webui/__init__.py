"""The live status page of one site: `live_status` (updated by the states) and `web_server` (mounted at /web)."""
from webui.live_status import FIELDS, LiveStatus, live_status
from webui.page import render_page
from webui.server import make_web_server, web_server

__all__ = ["FIELDS", "LiveStatus", "live_status", "make_web_server", "render_page", "web_server"]
