"""Driving the UI in headless Chromium (selenium): the page's elements by their ``elem_id``."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1600,1800")


def find_browser() -> tuple[str, str] | None:
    """(chromium, chromedriver) paths, or None."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    return None


def start(chromium: str, chromedriver: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    o = Options()
    for a in CHROMIUM_FLAGS:
        o.add_argument(a)
    o.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='jaxdrag-chromium-')}")
    o.binary_location = chromium
    return webdriver.Chrome(options=o, service=Service(chromedriver))


def wait_for(fn, timeout: float, what: str, every: float = 0.25):
    """Poll ``fn()`` until it returns something truthy; AssertionError naming ``what`` after ``timeout``."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = fn()
        except Exception as e:  # noqa: BLE001 - stale elements while Gradio re-renders
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def css(d, selector: str):
    from selenium.webdriver.common.by import By
    return d.find_element(By.CSS_SELECTOR, selector)


def css_all(d, selector: str):
    from selenium.webdriver.common.by import By
    return d.find_elements(By.CSS_SELECTOR, selector)


def text_of(d, elem_id: str) -> str:
    """The text of a Markdown block or the value of a Textbox."""
    boxes = css_all(d, f"#{elem_id} textarea") + css_all(d, f"#{elem_id} input")
    if boxes:
        return boxes[0].get_attribute("value") or ""
    return css(d, f"#{elem_id}").text


def click(d, elem_id: str) -> None:
    el = css(d, f"#{elem_id}")
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
    el.click()


def click_pixel(d, elem_id: str, xy, natural_scale: int) -> None:
    """Click pixel ``xy`` of the image shown in ``elem_id`` (displayed at ``natural_scale`` times
    the image's size, then scaled by the browser to the element's rendered size)."""
    from selenium.webdriver.common.action_chains import ActionChains

    img = css(d, f"#{elem_id} img")
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", img)
    nat = int(img.get_attribute("naturalWidth"))
    r = img.rect
    f = r["width"] / nat
    px = (xy[0] + 0.5) * natural_scale * f
    py = (xy[1] + 0.5) * natural_scale * f
    ActionChains(d).move_to_element_with_offset(img, px - r["width"] / 2, py - r["height"] / 2).click().perform()


def set_text(d, elem_id: str, value: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = (css_all(d, f"#{elem_id} textarea") + css_all(d, f"#{elem_id} input"))[0]
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(value)
    box.send_keys(Keys.TAB)


def upload(d, selector: str, path: Path) -> None:
    """Choose ``path`` in the file input ``selector`` (retried while Gradio re-renders it)."""
    def go():
        css(d, selector).send_keys(str(Path(path).resolve()))
        return True
    wait_for(go, 20, f"file input {selector}")


def open_accordion(d, title: str) -> None:
    from selenium.webdriver.common.by import By

    for el in d.find_elements(By.CSS_SELECTOR, "button.label-wrap, .label-wrap"):
        if title in el.text:
            d.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
            el.click()
            return
    raise AssertionError(f"no accordion titled {title!r}")


def save_editor(d, elem_id: str = "editor") -> None:
    """Press the image editor's ✓ (its value reaches the server only then)."""
    for b in css_all(d, f"#{elem_id} button"):
        if b.get_attribute("aria-label") == "Save changes":
            b.click()
            return
    raise AssertionError("the image editor has no 'Save changes' button")


def paint(d, elem_id: str, start_xy, steps: int = 10, step=(6, 0)) -> None:
    """A brush stroke on the editor's canvas from ``start_xy`` (offset from its centre, CSS px)."""
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = css_all(d, f"#{elem_id} canvas")[0]
    a = ActionChains(d).move_to_element_with_offset(canvas, *start_xy).click_and_hold()
    for _ in range(steps):
        a = a.move_by_offset(*step)
    a.release().perform()
