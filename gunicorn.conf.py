"""gunicorn settings read by the Procfile's `web` (gunicorn loads this file from the working folder)."""

import gc


def post_worker_init(worker):  # noqa: ARG001 - gunicorn's hook signature
    """Move the app's long-lived startup objects (the Stripe SDK's) out of the collector's scans:
    a full collection then no longer stalls a webhook's answer for tens of milliseconds."""
    gc.freeze()
