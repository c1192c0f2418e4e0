"""Queueing from the page (its Run button), and what the frontend shows the user when the prompt
fails at run time (an ``execution_error``).

Frontend 1.27 opens an error dialog: the failing node's type as its title, the exception's message
verbatim under it; the exception type only in the report behind "Show Report"
(src/components/dialog/content/ErrorDialogContent.vue). Frontend 1.58 shows, with its default
setting Comfy.RightSidePanel.ShowErrorsTab on, an error overlay at the top right whose copy comes
from its error catalog: "<node title> failed" and, for any exception it has no entry for, "This
node threw an error during execution. Check its inputs or try a different configuration."
(src/components/error/useErrorOverlayState.ts resolveSingleOverlayCopy, which prefers the
catalog's toastMessage; src/platform/errorCatalog/executionErrorResolver.ts; the copy in
src/locales/en/main.json errorCatalog.runtimeErrors.execution_failed). Its "View details" opens the
Issues panel, whose card holds the error report (Exception Type, Exception Message, traceback).
With that setting off, 1.58 opens its error dialog instead: "<node type> (#<id>)", then the node,
the catalog's "Node threw an error during execution." and the exception's message.
"""
from __future__ import annotations

import time

QUEUE_BUTTON = '[data-testid="queue-button"]'
# Keep the last execution_error the page's websocket delivered (what every surface is made from).
KEEP_EXECUTION_ERROR_JS = """
() => {
  window.__consistentStoryError = null;
  if (!window.__consistentStoryErrorHooked) {
    app.api.addEventListener("execution_error", (e) => { window.__consistentStoryError = e.detail; });
    window.__consistentStoryErrorHooked = true;
  }
}
"""
EXECUTION_ERROR_JS = "() => window.__consistentStoryError"
# The first error surface shown, {kind, text} (its visible text as the user reads it), or null.
ERROR_SURFACE_JS = """
() => {
  const shown = (e) => e && e.getClientRects().length > 0;
  const overlay = document.querySelector('[data-testid="error-overlay"]');
  if (shown(overlay)) return { kind: "overlay", text: overlay.innerText };
  const report = document.querySelector('[data-testid="error-dialog"], .comfy-error-report');
  const dialog = report?.closest('.p-dialog, [role="dialog"]') ?? report;
  if (shown(dialog)) return { kind: "dialog", text: dialog.innerText };
  return null;
}
"""
ISSUES_TEXT_JS = """
() => {
  const panel = document.querySelector('[data-testid="runtime-error-panel"]');
  return panel && panel.getClientRects().length > 0 ? panel.innerText : null;
}
"""
VIEW_DETAILS = '[data-testid="error-overlay-see-errors"]'
DISMISS_OVERLAY = '[data-testid="error-overlay-dismiss"]'
ISSUES_TAB_SETTING = "Comfy.RightSidePanel.ShowErrorsTab"


def click_run(page) -> dict:
    """Press Run; return the server's reply to the prompt the page posts (prompt_id, node_errors)."""
    with page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as posted:
        page.locator(QUEUE_BUTTON).click()
    return posted.value.json()


def failed_run(page, server) -> tuple[dict, dict]:
    """Press Run on a graph that fails while it runs; return the ``execution_error`` the page
    received and the surface it shows (``error_surface``)."""
    page.evaluate(KEEP_EXECUTION_ERROR_JS)
    reply = click_run(page)
    assert not reply.get("node_errors"), reply  # no check before the run refused it
    assert server.wait(reply["prompt_id"])["status"]["status_str"] == "error"
    return page.wait_for_function(EXECUTION_ERROR_JS).json_value(), error_surface(page)


def error_surface(page, timeout_s: float = 10) -> dict:
    """The error overlay or dialog the frontend shows after a failed run: ``{"kind", "text"}``."""
    deadline = time.monotonic() + timeout_s
    while True:
        surface = page.evaluate(ERROR_SURFACE_JS)
        if surface and surface["text"].strip():
            time.sleep(0.5)  # the overlay slides in, the dialog fills in
            return page.evaluate(ERROR_SURFACE_JS)
        if time.monotonic() > deadline:
            raise AssertionError("the frontend shows no error overlay or dialog after the failed run")
        time.sleep(0.1)


def one_line(text: str) -> str:
    """Text with its line breaks and runs of spaces as single spaces (the page wraps as it likes)."""
    return " ".join(text.split())
