"""Schemathesis hooks of the contract test (``st`` loads them through ``SCHEMATHESIS_HOOKS``).

The fuzzer authenticates as a device that it logs in through the API, as a client would. When
an operation it calls ends that device's session (a logout of the current device, say), the
next request gets 401 and Schemathesis' reactive re-authentication logs the device in again
and replays the request, so the rest of the run is not a stream of 401s."""

import os
import time

import requests
import schemathesis

LOGIN_TRIES = 5
LOGIN_WAIT_MAX_S = 5.0  # longest Retry-After the login honours before it gives up


@schemathesis.auth()
class DeviceLogin:
    """``Authorization: Bearer <token>`` of a device logged in with ``POST /devices``."""

    def get(self, case, context):
        api = os.environ["CONTRACT_API_URL"]
        login = {
            "username": os.environ["CONTRACT_USERNAME"],
            "password": os.environ["CONTRACT_PASSWORD"],
            "device_id": os.environ["CONTRACT_DEVICE_ID"],
            "platform": "web",
        }
        for _ in range(LOGIN_TRIES):
            response = requests.post(f"{api}/devices", json=login, timeout=10)
            if response.status_code == 429:  # a rate limit on logins: wait as told
                time.sleep(min(float(response.headers.get("Retry-After", 1)), LOGIN_WAIT_MAX_S))
                continue
            response.raise_for_status()
            return response.json()["token"]
        response.raise_for_status()

    def set(self, case, data, context):
        case.headers = case.headers or {}
        case.headers["Authorization"] = f"Bearer {data}"
