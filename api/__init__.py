"""The HTTP edge: the Interact REST API (and later SOAP), callbacks, tracking and reports."""
