"""An example deployment to copy: the Celery app, the tools, the LLM task and its providers."""
