"""The domain both the HTTP edge (`api`) and the Celery workers (`worker`) use."""
