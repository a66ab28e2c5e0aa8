"""A real browser for the sign-in test: ``BROWSER="python tests/chromium_browser.py %s"``.

Drives Debian's headless Chromium through its chromedriver (packages chromium and
chromium-driver; selenium from PyPI, no browser download): opens the sign-in address, clicks
the identity provider's "Sign in" button (``id="signin"``), lets the identity provider's
auto-submitting form_post page run its script, and waits until the proxy's localhost listener
answers "Sign-in complete". Chromium trusts the identity provider's test certificate by its
public key (``--ignore-certificate-errors-spki-list``, from $CHROMIUM_SPKI), not by ignoring
all certificate errors. Flags keep it from calling Google's services (refused on test machines).

$CHROMIUM_LOG receives one line per page reached: ``page <url without query> | <title>``, and
``error ...`` if something failed.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile


def flags(profile: str, spki: str | None) -> list[str]:
    chosen = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-default-apps", "--disable-extensions", "--disable-dev-shm-usage",
              "--no-default-browser-check", "--metrics-recording-only", "--password-store=basic",
              f"--user-data-dir={profile}"]
    if spki:
        chosen.append(f"--ignore-certificate-errors-spki-list={spki}")
    return chosen


def main() -> int:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = sys.argv[1]
    log = open(os.environ.get("CHROMIUM_LOG", os.devnull), "a", encoding="utf-8")
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    driver = None

    def page(note: str = "page") -> None:
        log.write(f"{note} {driver.current_url.split('?')[0]} | {driver.title}\n")
        log.flush()

    try:
        options = webdriver.ChromeOptions()
        options.binary_location = os.environ.get("CHROMIUM_BINARY") or shutil.which("chromium") or "chromium"
        for flag in flags(profile, os.environ.get("CHROMIUM_SPKI")):
            options.add_argument(flag)
        service = Service(executable_path=os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
                          or "/usr/bin/chromedriver")
        driver = webdriver.Chrome(service=service, options=options)
        driver.set_page_load_timeout(20)
        driver.get(url)
        page()
        WebDriverWait(driver, 15).until(lambda d: d.find_elements(By.ID, "signin"))
        driver.find_element(By.ID, "signin").click()
        WebDriverWait(driver, 20).until(lambda d: d.current_url.startswith("http://localhost")
                                        and d.find_elements(By.TAG_NAME, "h1"))
        page()
        log.write(f"text {driver.find_element(By.TAG_NAME, 'h1').text}\n")
        return 0
    except Exception as exc:  # a browser does not crash the program that opened it
        log.write(f"error {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n")
        if driver is not None:
            try:
                page("last")
            except Exception:
                pass
        return 1
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
