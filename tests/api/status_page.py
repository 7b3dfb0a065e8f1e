"""Drives the status page in headless Chromium (Debian's chromium + chromedriver, via selenium).

    status_page.py <base url> <token> <hostile title> <screenshot path>

Checks that the page asks for the token and then loads, that a running sync's bar advances
(fed by the event stream), that a database titled with markup renders as text (no element is
created from it, no script runs), and keeps a screenshot.
"""
import sys

from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

base, token, hostile, shot = sys.argv[1:5]

options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1400"):
    options.add_argument(arg)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
driver.set_page_load_timeout(30)


def fail(message):
    try:
        driver.save_screenshot(shot)
    finally:
        print("FAIL:", message, file=sys.stderr)
        driver.quit()
        sys.exit(1)


try:
    driver.get(base + "/")
    wait = WebDriverWait(driver, 30, poll_frequency=0.2)
    # No token yet: the login form shows and the dashboard does not.
    wait.until(lambda d: d.find_element(By.ID, "login").is_displayed())
    if driver.find_element(By.ID, "dashboard").is_displayed():
        fail("the dashboard shows before a token was given")
    box = driver.find_element(By.ID, "token")
    box.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait.until(lambda d: d.find_element(By.ID, "dashboard").is_displayed())
    # The token is kept in the session only.
    if driver.execute_script("return window.localStorage.length") != 0:
        fail("something was written to localStorage")
    if driver.execute_script("return sessionStorage.getItem('syncfleet.token')") != token:
        fail("the token is not kept in the session")

    # A running sync's bar advances.
    def pages(d):
        bars = d.find_elements(By.CSS_SELECTOR, "#active .run")
        return [int(b.get_attribute("data-pages") or 0) for b in bars]

    WebDriverWait(driver, 60, poll_frequency=0.2).until(lambda d: any(p > 0 for p in pages(d)))
    first = max(pages(driver))
    WebDriverWait(driver, 60, poll_frequency=0.2).until(lambda d: pages(d) and max(pages(d)) > first)
    second = max(pages(driver))
    width = driver.execute_script("return document.querySelector('#active .run .fill').style.width")
    print(f"bar advanced from {first} to {second} pages (width {width})", flush=True)

    # The hostile title is text: it appears verbatim and made no element.
    wait.until(lambda d: hostile in d.find_element(By.ID, "databases").text)
    if driver.find_elements(By.CSS_SELECTOR, "main img"):
        fail("an <img> element was created from a title")
    try:
        driver.switch_to.alert
        fail("a script from a title ran (an alert is open)")
    except NoAlertPresentException:
        pass
    # Readable on a phone: the layout fits a 390 px wide viewport without horizontal scrolling.
    driver.set_window_size(390, 844)
    wait.until(lambda d: d.execute_script("return window.innerWidth") <= 400)
    overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    if overflow > 1:
        fail(f"the page is {overflow}px wider than a phone screen")
    driver.set_window_size(1200, 1400)
    driver.save_screenshot(shot)
    print("status page ok; screenshot at", shot, flush=True)
finally:
    driver.quit()
