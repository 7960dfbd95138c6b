"""
Regenerate docs/status-page.png, the screenshot of the admin listener's status page that docs/admin.md
shows: run rproxy.test.test_status_page.ScreenshotTests (a real rproxy with three services, one upstream
ejected, one request in flight, in Debian's headless Chromium at 1200x800) and keep its screenshot::

    .venv/bin/python docs/tools/status_screenshot.py
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    """Run the test with the path to copy its screenshot to; its exit status."""
    target = os.path.join(ROOT, "docs", "status-page.png")
    test = "rproxy.test.test_status_page.ScreenshotTests"
    environment = dict(os.environ, RPROXY_STATUS_SCREENSHOT=target)
    trial = [sys.executable, "-m", "twisted.trial", "--reactor=rproxy", "--temp-directory=_trial_temp.screenshot"]
    return subprocess.call([*trial, test], cwd=ROOT, env=environment)


if __name__ == "__main__":
    sys.exit(main())
