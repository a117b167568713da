"""Property-based run of schemathesis over ``/openapi.json``: no answer is a 5xx.

The API runs standalone against localstripe with an authenticated key, so the
generated requests reach the real handlers (and Stripe calls) rather than stopping
at 401. Examples are bounded per operation so the run stays well under a minute.
Checkout Sessions go to the minimal endpoint tests/localstripe_server.py adds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
from api_helpers import register, token_from_ledger
from support.ledger import new_ledger, prepare_ledger
from support.processes import ApiProcess

ST = str(Path(sys.executable).parent / "schemathesis")


def test_schemathesis_finds_no_server_error(tmp_path: Path, localstripe: str) -> None:
    db = new_ledger(tmp_path)
    prepare_ledger(db)
    api = ApiProcess(
        db,
        {
            "stripe_api_key": "sk_test_schema",
            "stripe_api_base": localstripe,
            "stripe_webhook_secret": "whsec_schema",
        },
    ).start()
    try:
        for i in range(3):  # so the key in use is not id 1, 2 or 3
            register(api.url, f"filler{i}@example.com")
        body = register(api.url, "fuzz@example.com")
        token = token_from_ledger(db, "fuzz@example.com")
        assert httpx.post(f"{api.url}/auth/verify", json={"token": token}).status_code == 200
        p = subprocess.run(
            [
                ST,
                "run",
                f"{api.url}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--phases",
                "examples,coverage,fuzzing",
                "--max-examples",
                "20",
                "--seed",
                "6",
                "--workers",
                "1",
                "--request-timeout",
                "20",
                "-H",
                f"Authorization: Bearer {body['api_key']['key']}",
                # POST /fetch and /proxies/test relay the gateway's verdict on a
                # destination (502, 504) and are served by the gateway only (503 here):
                # their 5xx are answers, not faults; tests/e2e/test_routing_insight.py
                # drives them
                "--exclude-path",
                "/fetch",
                "--exclude-path",
                "/proxies/test",
            ],
            capture_output=True,
            text=True,
            timeout=240,
            cwd=tmp_path,  # schemathesis keeps a .schemathesis/ folder in its cwd
            env={"NO_COLOR": "1", "PATH": "/usr/bin:/bin"},
        )
        assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]
        print(p.stdout[-3000:])
    finally:
        api.stop()
