"""The bottle app behind /web: the page at / and the raw figures at /status.json."""
import bottle

from webui.live_status import LiveStatus, live_status
from webui.page import render_page


def make_web_server(status: LiveStatus) -> bottle.Bottle:
    server = bottle.Bottle()

    @server.get("/")
    def page():
        bottle.response.content_type = "text/html; charset=utf-8"
        return render_page(status.snapshot())

    @server.get("/status.json")
    def status_json():
        # A dict return value makes bottle answer application/json.
        return status.snapshot()

    return server


web_server = make_web_server(live_status)
