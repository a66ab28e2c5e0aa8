"""A minimal "browser" for tests: ``BROWSER="python tests/fake_browser.py %s"``.

It opens the URL it is given, follows redirects, and submits the first form of every HTML
page it gets (the identity provider's sign-in page, then its auto-submitting form_post page),
the way a user clicking "Sign in" would, until a page without a form arrives (the proxy's
"Sign-in complete"). It trusts the CA in $FAKE_BROWSER_CA; $FAKE_BROWSER_LOG receives a line
per request (method, URL without query, status) so tests can check what happened.
"""

from __future__ import annotations

import html.parser
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request


class _FormParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.form: dict | None = None
        self._in_first = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        if tag == "form" and self.form is None:
            self.form = {"action": attributes.get("action", ""), "method": attributes.get("method", "get"),
                         "fields": []}
            self._in_first = True
        elif tag == "input" and self._in_first and attributes.get("name"):
            if attributes.get("type", "text") not in ("checkbox", "radio") or "checked" in attributes:
                self.form["fields"].append((attributes["name"], attributes.get("value", "")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_first = False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def browse(url: str, ca_file: str | None, log=None, max_steps: int = 10) -> str:
    context = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirect,
                                         urllib.request.ProxyHandler({}))
    method, data = "GET", None
    for _ in range(max_steps):
        request = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            response = opener.open(request, timeout=20)
        except urllib.error.HTTPError as exc:
            response = exc
        body = response.read().decode("utf-8", "replace")
        if log:
            log.write(f"{method} {url.split('?')[0]} {response.status}\n")
            log.flush()
        if response.status in (301, 302, 303, 307) and response.headers.get("Location"):
            url, method, data = urllib.parse.urljoin(url, response.headers["Location"]), "GET", None
            continue
        parser = _FormParser()
        parser.feed(body)
        if parser.form is None:
            return body
        url = urllib.parse.urljoin(url, parser.form["action"] or url)
        encoded = urllib.parse.urlencode(parser.form["fields"])
        if parser.form["method"].lower() == "post":
            method, data = "POST", encoded.encode()
        else:
            method, data = "GET", None
            url = f"{url.split('?')[0]}?{encoded}"
    raise SystemExit("fake_browser: too many steps")


def main() -> int:
    log_path = os.environ.get("FAKE_BROWSER_LOG")
    log = open(log_path, "a", encoding="utf-8") if log_path else None
    try:
        browse(sys.argv[1], os.environ.get("FAKE_BROWSER_CA"), log)
    except Exception as exc:  # a browser does not crash the program that opened it
        if log:
            log.write(f"error {exc.__class__.__name__}: {exc}\n")
        return 1
    finally:
        if log:
            log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
