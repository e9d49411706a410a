"""The browser page signs in through the identity provider: ``GET /auth/config`` names it, the page
sends the browser to the provider's login (authorization code + PKCE, no client secret), and the
access token it brings back signs the page in. A real OpenID provider (tests/oidc) and Chromium."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_web import CHROMIUM, CHROMIUM_ARGS, sync_playwright


@pytest.fixture
def page(oidc_stack) -> Iterator:
    if sync_playwright is None or not Path(CHROMIUM).is_file():
        pytest.fail("Playwright and Chromium are needed (see tests/test_web.py)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(base_url=oidc_stack.url)
            context.set_default_timeout(60_000)
            yield context.new_page()
        finally:
            browser.close()


def test_sign_in_with_the_provider(page, oidc_stack, oidc_provider):
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto("/")
    page.get_by_role("button", name="Sign in with your provider").click()
    page.wait_for_url(f"{oidc_provider.issuer}/**")  # the provider's login page
    authorize = next(u for u in requests if u.startswith(f"{oidc_provider.issuer}/auth?"))
    assert "code_challenge_method=S256" in authorize and "state=" in authorize and "secret" not in authorize
    page.locator("input[name=login]").fill("browser-user")
    page.locator("input[name=password]").fill("any")
    page.locator("button[type=submit]").click()
    page.get_by_role("button", name="Continue").click()  # the provider's consent step
    page.wait_for_url(f"{oidc_stack.url}/")  # back, with the code taken out of the address
    page.wait_for_function("() => document.querySelector('#session-status').textContent.includes('provider')")
    assert page.locator("#session-status").text_content() == "Signed in with your provider."
    token = page.wait_for_function("() => sessionStorage.getItem('dataport.token')").json_value()
    assert token and token.count(".") == 2  # kept like a pasted token


def test_a_forged_return_is_refused(page, oidc_stack):
    page.goto("/?code=stolen&state=guessed")
    page.wait_for_function("() => !document.querySelector('#notice').hidden")
    assert "unexpected state" in page.locator("#notice").text_content()
    assert page.url == f"{oidc_stack.url}/"
